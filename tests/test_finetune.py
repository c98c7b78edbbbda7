"""Fine-tuning (paper §4.6): the pre-trained trunk is really loaded, and accuracy rises above chance."""
import pytest
import torch
import torch.nn.functional as F

from grafit_core.checkpoint import load_trained
from grafit_core.config import config_from_dict, with_overrides
from grafit_core.data import prepare_data
from grafit_core.data.transforms import build_transform
from grafit_core.data.views import TrainViews
from grafit_core.distributed import DistContext
from grafit_core.engine import build_loader, fit, set_epoch
from grafit_core.finetune import FinetuneNet, _as_optim, feature_dim, finetune

torch.set_num_threads(1)
JOB = {"seed": 4,
       "data": {"name": "synthetic", "train_level": "l0", "augment": "characters", "image_size": 16,
                "options": {"branching": [2, 3, 2], "per_class": 10, "queries_per_class": 4}},
       "model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32},
       "optim": {"epochs": 3, "batch_size": 16},
       "eval": {"val_size": 20, "k_candidates": [3, 5]},
       "finetune": {"epochs": 12, "batch_size": 16, "base_lr": 0.05, "level": "l2"}}


def quiet(_):
    pass


def test_finetune_starts_from_the_pretrained_trunk_and_learns_the_fine_labels(tmp_path):
    cfg = config_from_dict(JOB)
    train, test = prepare_data(cfg.data)
    ckpt = str(tmp_path / "pretrained")
    fit(cfg, train, test, on_epoch=lambda e, s, save: save(ckpt), log=quiet)       # coarse labels (l0)
    ft_cfg = with_overrides(cfg, {"finetune.checkpoint": ckpt})
    res = finetune(ft_cfg, train, test, log=quiet)
    scratch = finetune(with_overrides(ft_cfg, {"finetune.checkpoint": None, "finetune.epochs": 1}), train, test,
                       log=quiet)
    first = res.history[0]["first_step_loss"]
    assert abs(first - scratch.history[0]["first_step_loss"]) > 1e-3             # not a random start

    # by hand: the checkpoint's trunk, a head from the same seed, the loader's first batch
    _, method, meta = load_trained(ckpt)
    eval_tf = build_transform("characters", 16, meta["in_channels"], train=False)
    dim = feature_dim(method.net.trunk, eval_tf(train.image(0)))
    torch.manual_seed(cfg.seed + 1)
    net = FinetuneNet(method.net.trunk, dim, train.num_classes("l2"), "fc", 1024).train()
    torch.manual_seed(cfg.seed)
    tf = build_transform("characters", 16, meta["in_channels"], train=True)
    loader = build_loader(TrainViews(train, train.labels_at("l2"), tf, 1, ft_cfg.seed), _as_optim(ft_cfg),
                          DistContext())
    set_epoch(loader, 0)
    views, y, _ = next(iter(loader))
    assert F.cross_entropy(net(views[:, 0]), y).item() == pytest.approx(first, abs=1e-6)

    chance = 1 / train.num_classes("l2")                                          # 12 classes
    assert res.metrics["finetune_top1/l2"] > 3 * chance
    assert res.metrics["finetune_top5/l2"] >= res.metrics["finetune_top1/l2"]
    assert [h["epoch"] for h in res.history] == list(range(1, 13))


def test_finetune_resumes_bitwise_from_its_checkpoint(tmp_path):
    cfg = with_overrides(config_from_dict(JOB), {"finetune.epochs": 3})
    train, test = prepare_data(cfg.data)

    def saving(epoch, stats, save):
        save(str(tmp_path / f"epoch{epoch}"))

    full = finetune(cfg, train, test, on_epoch=saving, log=quiet)
    resumed = finetune(cfg, train, test, resume_from=str(tmp_path / "epoch1"), log=quiet)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert resumed.metrics == full.metrics
    from grafit_core.errors import ConfigError
    with pytest.raises(ConfigError, match="finetune.head: 'fc' in the checkpoint, 'mlp' now"):
        finetune(with_overrides(cfg, {"finetune.head": "mlp"}), train, test, resume_from=str(tmp_path / "epoch1"),
                 log=quiet)


@pytest.mark.timeout(600)
def test_grafit_finetune_through_ray_train_equals_the_plain_run_and_is_tracked(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    import yaml
    from mlflow.tracking import MlflowClient
    from grafit_core.config import load_config
    from orchestrator.cli import main as grafit
    cfg = config_from_dict(JOB)
    train, test = prepare_data(cfg.data)
    ckpt = tmp_path / "pretrained"
    fit(cfg, train, test, on_epoch=lambda e, s, save: save(str(ckpt)), log=quiet)
    job = tmp_path / "ft.yaml"
    job.write_text(yaml.safe_dump({**JOB, "name": "ft", "finetune": {**JOB["finetune"], "epochs": 3,
                                                                     "checkpoint": "pretrained", "head": "mlp"}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        assert grafit(["finetune", str(job), "--workers", "1", "--num-cpus", "2",
                       "--storage-path", str(tmp_path / "runs")]) == 0
    finally:
        ray.shutdown()
    reference = finetune(load_config(str(job)), train, test, log=quiet)       # the same job, in this process
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("ft").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["finetune.head"] == "mlp"
    for key in ("finetune_top1/l2", "finetune_top5/l2"):
        assert run.data.metrics[key] == pytest.approx(reference.metrics[key], abs=1e-6), key
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
