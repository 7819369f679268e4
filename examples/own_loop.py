"""Your own training loop, the one the PyTorch tutorials teach, resumable bit for bit with etappe's pieces:
``etappe.ResumableLoader`` (a DataLoader that knows its position inside the epoch), ``etappe.RandomState`` (every
random generator) and ``etappe.CheckpointStore`` (crash-safe checkpoints). Killed at any moment, even with
``kill -9`` mid-epoch, and run again, it ends with the same weights and optimizer state as a run never stopped.

    python examples/own_loop.py                      # trains, checkpoints every 5 steps into a temporary folder
    python examples/own_loop.py --run-dir runs/own   # run it again after a kill: it resumes from the newest one
"""

import argparse
import tempfile

import torch
from torch import nn

import etappe
from etappe.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=None, help="checkpoints and the final weights (default: a new temporary folder)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-every", type=int, default=5, help="optimizer steps between checkpoints")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="etappe-own-loop-")

    torch.manual_seed(0)
    data = load_dataset("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    loss_fn = nn.CrossEntropyLoss()
    loader = etappe.ResumableLoader(data.train, batch_size=32, shuffle=True, seed=0, num_workers=args.workers)
    rng = etappe.RandomState()  # Python, NumPy, torch (and CUDA): dropout draws from them
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader, "rng": rng}

    store = etappe.CheckpointStore(f"{run_dir}/checkpoints", keep_last=2)
    step = 0
    if store.latest() is not None:
        step = store.load(**state)["step"]  # the random state last: it is the last entry of `state`
        print(f"resumed at step {step} (epoch {loader.epoch + 1}, batch {loader.batches_done})", flush=True)

    for epoch in range(loader.epoch, args.epochs):
        loader.set_epoch(epoch)  # keeps the position when resuming inside this epoch
        model.train()
        for x, y in loader:  # after a resume: only the batches of this epoch not yet trained on
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.save_every == 0:
                store.save(step, {**state, "step": step})
                print(f"saved step {step}", flush=True)
        scheduler.step()
        result = etappe.evaluate(model, data.test, loss_fn)  # model.eval() and torch.inference_mode() inside
        print(f"epoch {epoch + 1}: test accuracy {100 * result['accuracy']:.2f}%", flush=True)

    store.close()
    etappe.save(f"{run_dir}/final", model=model, optimizer=optimizer)
    print(f"done at step {step}; weights and optimizer in {run_dir}/final", flush=True)


if __name__ == "__main__":
    main()
