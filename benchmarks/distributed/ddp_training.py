"""HFP8 data-parallel training on torch.distributed (gloo, CPU): gradient communication in
float32 against the 1-5-2 hook with and without error feedback.

    python benchmarks/distributed/ddp_training.py [--world 2] [--epochs 1]

Each of ``world`` processes (spawned here, one thread each) trains the same seeded Fashion-MNIST
CNN (the built-in example's architecture, from scratch) in HFP8 (1-4-3 forward, 1-5-2 backward)
on its shard of the 60,000 training images (batches of 64, Adam with a one-cycle schedule),
wrapped in DistributedDataParallel. Rows: DDP's
float32 all-reduce, the 1-5-2 hook with error feedback, the hook without it. Prints per row the
bytes one rank sends per step for the gradients (the hook counts its messages; float32 is a ring
all-reduce's ``2 (w - 1) / w x 4`` bytes per value), wall time, and top-1 on the 10,000 test
images; writes results/ddp_<world>.json and a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

HERE = Path(__file__).resolve().parent

VARIANTS = ("float32 all-reduce", "1-5-2 hook, error feedback", "1-5-2 hook, no error feedback")


def _worker(rank, world, init, out, variant, epochs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    from hfp8.examples.fashion_cnn import fashion_cnn
    from hfp8.examples.fashion_mnist import load_fashion_mnist
    from hfp8.training import prepare_training
    from hfp8.training.communication import E5M2Communication, e5m2_hook

    images, labels = load_fashion_mnist("train")
    x, y = images.float().unsqueeze(1) / 255, labels
    torch.manual_seed(0)
    model, training = prepare_training(fashion_cnn(), x[:64])
    parallel = DistributedDataParallel(model)
    state = None
    if variant != "float32 all-reduce":
        state = E5M2Communication(error_feedback="no error" not in variant)
        parallel.register_comm_hook(state, e5m2_hook)
    optimizer = torch.optim.Adam(parallel.parameters(), lr=2e-3)
    # one-cycle schedule down to ~0: the final model is then a settled one, not a snapshot of
    # a constant-rate walk whose test accuracy moves by points from one step to the next
    per_epoch = len(range(0, len(x) // world - 63, 64))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3,
                                                   total_steps=epochs * per_epoch)
    curve, steps, start = [], 0, time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        shard = order[rank::world]
        for i in range(0, len(shard) - 63, 64):
            index = shard[i:i + 64]
            loss = F.cross_entropy(parallel(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            training.step(optimizer)
            schedule.step()
            if steps % 20 == 0:
                curve.append({"step": steps, "loss": loss.item()})
            steps += 1
    seconds = time.perf_counter() - start
    if rank == 0:
        test_images, test_labels = load_fashion_mnist("test")
        model.eval()
        with torch.no_grad():
            logits = model(test_images.float().unsqueeze(1) / 255)
        count = sum(p.numel() for p in model.parameters())
        float32 = 2 * (world - 1) / world * 4 * count
        sent = state.bytes_sent / max(steps, 1) if state is not None else float32
        torch.save({"curve": curve, "seconds": seconds, "steps": steps,
                    "top1": float((logits.argmax(1) == test_labels).float().mean()),
                    "bytes_per_step": sent, "float32_bytes_per_step": float32,
                    "skipped": training.skipped}, out)
    dist.destroy_process_group()


def main() -> None:
    from plotting import plot_loss_curves
    from results_doc import add_update_flag, render_ddp, write_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    add_update_flag(parser)
    args = parser.parse_args()
    results = {}
    for variant in VARIANTS:
        folder = tempfile.mkdtemp()
        out = os.path.join(folder, "result.pt")
        init = f"file://{os.path.join(folder, 'rendezvous')}"
        mp.start_processes(_worker, args=(args.world, init, out, variant, args.epochs),
                           nprocs=args.world, start_method="spawn")
        results[variant] = torch.load(out, weights_only=False)
        r = results[variant]
        print(f"{variant:32s} top-1 {r['top1']:.4f}  bytes/step/rank {r['bytes_per_step']:,.0f} "
              f"({r['float32_bytes_per_step'] / r['bytes_per_step']:.2f}x fewer than float32)  "
              f"{r['seconds']:.0f} s  skipped {r['skipped']}", flush=True)
    folder = HERE / "results"
    folder.mkdir(exist_ok=True)
    (folder / f"ddp_{args.world}.json").write_text(json.dumps(results, indent=1) + "\n")
    series = {f"{variant}: top-1 {r['top1']:.4f}": r["curve"] for variant, r in results.items()}
    plot_loss_curves(series, folder / f"ddp_{args.world}.png",
                     f"HFP8 data-parallel training, {args.world} processes", xlabel="step (rank 0)")
    if args.update_docs:  # both process counts' stored JSON, this run's included
        write_section("ddp", render_ddp())


if __name__ == "__main__":
    sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]
    main()
