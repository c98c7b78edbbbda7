"""GPU benchmark: Grafit's training step against a plain cross-entropy step of the same trunk, and
the exact evaluation at ImageNet scale. Needs only grafit_core and PyTorch (+ torchvision): a GPU
machine may have neither Ray, MLflow nor a package registry. Run through benchmarks/gpu.sh.

    bash benchmarks/gpu.sh            # ResNet-50, 224 px, bf16 and fp32 (optim.precision), N = 1,281,167
    bash benchmarks/gpu.sh --tiny     # a correctness run at a tiny size (CPU is fine)

Training: the largest batch (from a list, halving on out-of-memory) that fits, images/s over a few
timed steps after warm-up; Grafit trains on 2 views per image with the kNN loss over an N-row
memory and the EMA target, CE on 1 view. Evaluation: Q queries x N collection rows (d = 128, two
levels), kNN + mAP (cosine and conditioned) in one pass, and the bare matrix product it is
measured against.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grafit_core.config import Config  # noqa: E402
from grafit_core.distributed import DistContext  # noqa: E402
from grafit_core.memory import MemoryBank  # noqa: E402
from grafit_core.methods import get_method  # noqa: E402
from grafit_core.metrics import Ranking, evaluate_pass, normalise  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_rate(name, precision, args, device):
    """(batch, images/s) of the largest batch of args.batches that fits, at optim.precision `precision`."""
    cfg = Config()
    cfg.method.name, cfg.model.trunk, cfg.model.width = name, args.trunk, args.width
    cfg.optim.precision = precision                # the method's own autocast (the kNN loss stays fp32)
    cfg.model.small_stem = args.image_size <= 64
    cfg.data.num_views = 2 if name != "ce" else 1
    for batch in args.batches:
        method = memory = opt = None
        try:
            torch.manual_seed(0)
            method = get_method(name)(cfg, 3, args.classes).to(device)
            dim = method.net.embed_dim                 # CE embeds with its trunk features
            memory = MemoryBank(torch.randint(0, args.classes, (args.n,)), dim, device=device)
            memory.fill(torch.arange(args.n, device=device), normalise(torch.randn(args.n, dim, device=device)))
            opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
            views = torch.randn(batch, cfg.data.num_views, 3, args.image_size, args.image_size, device=device)
            labels = torch.randint(0, args.classes, (batch,), device=device)
            indices = torch.randperm(args.n, device=device)[:batch]

            def step():
                loss, _, z = method.training_step(views, labels, indices, memory)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                method.after_step(0.99)
                memory.update(indices, z)

            for _ in range(2):
                step()
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            return batch, batch * args.steps / (time.perf_counter() - start)
        except torch.OutOfMemoryError:
            method = memory = opt = None        # free before the smaller batch  # noqa: F841
            torch.cuda.empty_cache()
    raise RuntimeError(f"no batch of {args.batches} fits")


def eval_rate(args, device):
    """Seconds of the bare product and of the one-pass evaluation (kNN + mAP cosine and conditioned)."""
    g = torch.Generator(device=device).manual_seed(0)
    fine = torch.randint(0, 1000, (args.n,), device=device, generator=g)
    centres = torch.randn(1000, 128, device=device, generator=g)
    bank = centres[fine] + 2.6 * torch.randn(args.n, 128, device=device, generator=g)
    qf = torch.randint(0, 1000, (args.queries,), device=device, generator=g)
    query = centres[qf] + 2.6 * torch.randn(args.queries, 128, device=device, generator=g)
    labels, qlabels = {"fine": fine, "coarse": fine % 127}, {"fine": qf, "coarse": qf % 127}
    qn, bn = normalise(query), normalise(bank)
    sync(device)
    start = time.perf_counter()
    for s in range(0, args.queries, 1024):
        torch.mm(qn[s:s + 1024], bn.T)
    sync(device)
    t_mm = time.perf_counter() - start
    start = time.perf_counter()
    preds, aps = evaluate_pass(query, bank, 0, labels, qlabels, {"fine": 1000, "coarse": 127}, DistContext(),
                               votes={("fine", 20, 0.05), ("coarse", 20, 0.05)}, ap_levels=["fine", "coarse"],
                               rankings={"cosine": Ranking(), "cond": Ranking("coarse", k=20, sigma=0.05)},
                               chunk_size=args.eval_chunk)
    sync(device)
    t_eval = time.perf_counter() - start
    top1 = float((preds[("fine", 20, 0.05)] == qf).float().mean())
    return t_mm, t_eval, top1, float(aps[("cosine", "fine")][:, 0].nanmean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a small correctness run (CPU is fine)")
    p.add_argument("--trunk", default="resnet50", help="trunk (default resnet50)")
    p.add_argument("--width", type=int, default=64, help="conv4 width (tiny runs)")
    p.add_argument("--image-size", type=int, default=224, help="input size in px (default 224)")
    p.add_argument("--n", type=int, default=1_281_167, help="memory / collection rows (default ImageNet's)")
    p.add_argument("--queries", type=int, default=50_000, help="evaluation queries (default 50,000)")
    p.add_argument("--classes", type=int, default=1000, help="training classes (default 1000)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps after 2 warm-up steps")
    p.add_argument("--batches", default="512,384,256,192,128,96,64,32", help="batch sizes tried, largest first")
    p.add_argument("--eval-chunk", type=int, default=512, help="queries per evaluation chunk")
    args = p.parse_args(argv)
    if args.tiny:
        args.trunk, args.width, args.image_size, args.n, args.queries = "conv4", 16, 32, 2000, 200
        args.classes, args.steps, args.batches, args.eval_chunk = 20, 2, "16,8", 64
    args.batches = [int(b) for b in str(args.batches).split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {card}; torch {torch.__version__}; trunk {args.trunk} {args.image_size}px; N = {args.n:,}",
          flush=True)
    rates = {}
    for precision in ("bf16", "fp32"):
        for name in ("grafit", "ce"):
            batch, rate = train_step_rate(name, precision, args, device)
            rates[name, precision] = rate
            print(f"train {name:6s} {precision} batch {batch:4d}: {rate:9.1f} images/s", flush=True)
        print(f"train grafit / ce images/s ({precision}): {rates['grafit', precision] / rates['ce', precision]:.2f}",
              flush=True)
    print(f"train bf16 / fp32 images/s: grafit {rates['grafit', 'bf16'] / rates['grafit', 'fp32']:.2f}, "
          f"ce {rates['ce', 'bf16'] / rates['ce', 'fp32']:.2f}", flush=True)
    t_mm, t_eval, top1, m = eval_rate(args, device)
    print(f"eval Q={args.queries:,} N={args.n:,} d=128: product {t_mm:.2f} s, kNN + mAP (2 levels, cosine + "
          f"conditioned, one pass) {t_eval:.2f} s = {t_eval / t_mm:.1f}x; kNN top-1 {top1:.3f}, mAP {m:.3f}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
