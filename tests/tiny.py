"""The tiny synthetic job the Ray and sweep tests train: 72 images, an epoch in well under a second."""


def tiny_job(name: str, epochs: int = 2) -> dict:
    return {"name": name,
            "data": {"name": "synthetic", "train_level": "l0", "augment": "characters", "image_size": 16,
                     "options": {"branching": [2, 3, 2], "per_class": 6, "queries_per_class": 2}},
            "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
            "optim": {"epochs": epochs, "batch_size": 16},
            "eval": {"val_size": 20, "k_candidates": [3, 5]}}
