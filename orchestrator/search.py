"""`grafit search`: rank a collection for a query image with a trained model (paper §3.2).

The collection's embeddings are computed once and saved as a Parquet index (path, embedding,
class name at every level) keyed by the checkpoint and the collection's files, then reused
for every query. With `--coarse LABEL` the ranking is conditioned on a coarse class the user
gives (the paper's interface scenario: eq. 5 with p_c one-hot, i.e. that class's items first).
"""
from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import torch

from grafit_core.errors import GrafitError

def index_key(checkpoint: str, paths: list[str], levels: list[str], pipeline) -> str:
    """Changes when the model, its input pipeline, the level names or any collection file (name,
    size or modification time) changes: an index built another way is never reused."""
    h = hashlib.sha256(",".join(levels).encode() + pipeline.key().encode())
    state = os.path.join(checkpoint, "train_state.pt")
    h.update(f"{os.path.abspath(state)}\0{os.path.getsize(state)}\0{os.path.getmtime(state)}".encode())
    for p in paths:
        st = os.stat(p)                         # a file rewritten at the same size has another mtime
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_or_load_index(checkpoint: str, root: str, index_dir: str, cfg, method, meta, levels: list[str]):
    """(paths, embeddings N x d, {level: class names}) of every image under root."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from grafit_core.data.folders import load_folders
    from grafit_core.distributed import DistContext
    from grafit_core.engine import embed

    pipe = meta["pipeline"]
    coll, _ = load_folders(root, levels=levels, channels=pipe.channels, invert=pipe.invert,
                           cache_size=pipe.decoded_size)
    path = os.path.join(index_dir, f"index_{index_key(checkpoint, coll.paths, levels, pipe)}.parquet")
    if os.path.exists(path):
        table = pq.read_table(path)
        return (table.column("path").to_pylist(), np.array(table.column("embedding").to_pylist(), dtype=np.float32),
                {lv: table.column(f"class_{lv}").to_pylist() for lv in levels}, path, False)
    z, _ = embed(method, coll, cfg, DistContext(), pipe.transform())
    names = {lv: [coll.hierarchy.classes[lv][i] for i in coll.labels_at(lv)] for lv in levels}
    table = pa.table({"path": coll.paths, "embedding": pa.array(z.numpy().tolist(), pa.list_(pa.float32())),
                      **{f"class_{lv}": names[lv] for lv in levels}})
    os.makedirs(index_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)                       # atomic: a killed build never leaves half an index
    return coll.paths, z.numpy(), names, path, True


def rank(query_z: np.ndarray, bank: np.ndarray, coarse_names: list[str], coarse: str | None, top: int,
         backend: str = "torch"):
    """Indices and scores of the top items by cosine, or by eq. 5 with a one-hot p_c when a coarse
    class is given (its items first, each part by cosine). Among equal scores the lower index comes
    first. torch: exact scores of every item; faiss: an exact inner-product search of the
    normalised rows for the top only, whose rows keep that order, but which of several rows tied
    at the last place it returns is faiss' choice (grafit_core.metrics.FaissFlat)."""
    unit = bank / (np.linalg.norm(bank, axis=1, keepdims=True) + 1e-12)
    qz = (query_z / (np.linalg.norm(query_z) + 1e-12)).astype(np.float32)
    eps = 1e-6
    logit = np.log(1 - eps) - np.log(eps)         # log(p / (1 - p)) at p = 1 - eps, and its negative
    mine = np.asarray(coarse_names) == coarse if coarse is not None else np.ones(len(bank), bool)
    if backend == "faiss":
        from grafit_core.metrics import FaissFlat
        order, scores = [], []
        for part, shift in ((np.flatnonzero(mine), logit), (np.flatnonzero(~mine), -logit)):
            k = min(top - len(order), len(part))
            if k > 0:
                sims, idx = FaissFlat(torch.from_numpy(unit[part])).search(torch.from_numpy(qz[None]), k)
                order += part[idx[0].numpy()].tolist()
                scores += (sims[0].numpy() + (shift if coarse is not None else 0.0)).tolist()
        return np.asarray(order, dtype=np.int64), np.asarray(scores)
    scores = unit @ qz
    if coarse is not None:
        scores = scores + np.where(mine, logit, -logit)
    order = np.argsort(-scores, kind="stable")[:top]
    return order, scores[order]


def open_model(checkpoint: str):
    """(config, method, meta) of `--checkpoint` for a command, one line on stderr when it is not the
    end of its training (a mid-training checkpoint: its results are of that model)."""
    from grafit_core.checkpoint import load_trained
    try:
        cfg, method, meta = load_trained(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise GrafitError(f"--checkpoint: {err}") from None
    t = meta["trained"]
    if t["epoch"] != t["of"] or t["batches"]:
        print(f"grafit: warning: --checkpoint {checkpoint} was saved after {t['epoch']} of {t['of']} epochs"
              f"{' and ' + str(t['batches']) + ' batches' if t['batches'] else ''}: not its training's end",
              file=sys.stderr)
    return cfg, method, meta


def search(args) -> list[dict]:
    cfg, method, meta = open_model(args.checkpoint)
    if args.backend == "faiss":
        import importlib.util
        if importlib.util.find_spec("faiss") is None:
            raise GrafitError("--backend faiss: faiss is not installed (pip install faiss-cpu)")
    for q in args.query:
        if not os.path.isfile(q):
            raise GrafitError(f"query image {q}: no such file")
    levels = args.levels.split(",")
    paths, bank, names, index_path, built = build_or_load_index(
        args.checkpoint, args.collection, args.index_dir, cfg, method, meta, levels)
    coarse_names = names[levels[0]]
    if args.coarse is not None and args.coarse not in set(coarse_names):
        known = sorted(set(coarse_names))
        raise GrafitError(f"--coarse {args.coarse!r}: not a class of level {levels[0]!r} in {args.collection}; "
                          f"known: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
    pipe = meta["pipeline"]
    tf, results = pipe.transform(), []
    for q in args.query:
        with torch.no_grad():
            z = method.embed(tf(pipe.decode(q))[None])[0][0].numpy()
        order, scores = rank(z, bank, coarse_names, args.coarse, args.top, args.backend)
        results.append({"query": q, "index": index_path, "index_built": built, "coarse": args.coarse,
                        "results": [{"rank": r + 1, "score": float(s), "path": paths[i],
                                     **{lv: names[lv][i] for lv in levels}}
                                    for r, (i, s) in enumerate(zip(order, scores))]})
    return results
