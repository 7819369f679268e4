"""Profile: where one training step of the Fashion-MNIST CNN (batch 64, Adam lr 1e-3) goes.

Two measurements, alternated in rounds:
  trainer   etappe.loop.Trainer.fit(1) over N steps: seconds per step as etappe runs it
  staged    the same step built from the same parts (ResumableBatches, TensorData.batch, model, loss, Adam), with
            a perf_counter between stages: data (index + uint8->float), forward, loss (+ .item()), zero_grad +
            backward, optimizer step
Loop overhead = trainer's step time - the staged step time. Both run with torch's deterministic algorithms on, as
the Trainer sets them on CPU. --torch-profiler also prints torch.profiler's top operators for a few steps.

    .venv/bin/python benchmarks/profile_step.py               # 200 steps per round, 5 rounds
    .venv/bin/python benchmarks/profile_step.py --full        # 900 steps per round (one epoch), 5 rounds
"""

from __future__ import annotations

import time

import common

STAGES = ("data", "forward", "loss", "backward", "optimizer")


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    p.add_argument("--torch-profiler", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch
    from torch import nn

    from etappe import models
    from etappe.data import ResumableBatches, TensorData, load_dataset
    from etappe.loop import Trainer

    torch.set_num_threads(args.threads)
    steps = args.steps or (900 if args.full else 200)
    repeats = args.repeats or 5
    bs, opt_name = (64, "adam") if args.model == "cnn" else (32, "sgd")
    print(common.machine())
    ds = load_dataset("fashion-mnist")
    data = TensorData(ds.train.x[: steps * bs], ds.train.y[: steps * bs], ds.train.input_scale)

    def make():
        torch.manual_seed(0)
        model = models.build(args.model, (1, 28, 28), 10)
        opt_cls = torch.optim.Adam if opt_name == "adam" else torch.optim.SGD
        return model, opt_cls(model.parameters(), lr=1e-3), nn.CrossEntropyLoss()

    def trainer() -> float:
        model, opt, loss_fn = make()
        t = Trainer(model, opt, loss_fn, train_data=data, batch_size=bs, progress=False, quiet=True)
        seconds, _ = common.timed(lambda: t.fit(1))
        return seconds / steps

    class StepTime(float):
        """Seconds per step that also carries the per-stage seconds of its run (``parts``)."""

        parts: dict[str, float]

    def staged() -> float:
        torch.use_deterministic_algorithms(True)
        model, opt, loss_fn = make()
        model.train()
        sums = dict.fromkeys(STAGES, 0.0)
        clock = time.perf_counter
        start = clock()
        for idx in ResumableBatches(len(data), bs, seed=0).batches(0):
            t0 = clock()
            x, y = data.take(idx)
            t1 = clock()
            out = model(x)
            t2 = clock()
            loss = loss_fn(out, y)
            loss.item()
            t3 = clock()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t4 = clock()
            opt.step()
            t5 = clock()
            for k, a, b in zip(STAGES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
                sums[k] += b - a
        total = clock() - start
        result = StepTime(total / steps)
        result.parts = {k: v / steps for k, v in sums.items()} | {"between": (total - sum(sums.values())) / steps}
        return result

    trainer(), staged()  # warm-up
    rounds = common.Rounds()
    figures = common.alternate({"trainer": trainer, "staged": staged}, repeats, rounds=rounds)
    # Shares are taken within each round (stages of the staged run over that run's total; the loop overhead as
    # (trainer - staged) / trainer of the same round), then the median over rounds: on a busy machine absolute
    # times from different rounds do not add up.
    per_step = common.median(figures["trainer"])
    overhead = common.median((a - b) / a for a, b in zip(figures["trainer"], figures["staged"]))
    parts = {k: (1 - overhead) * common.median(t.parts[k] / t for t in figures["staged"])
             for k in (*STAGES, "between")}
    parts["loop overhead"] = overhead
    parts = {k: v * per_step for k, v in parts.items()}
    rows = [[k, v * 1e3, 100 * v / per_step] for k, v in parts.items()]
    rows.append(["trainer step (total)", per_step * 1e3, 100.0])
    common.table(f"one {args.model} step, batch {bs}, {opt_name}, ms (median of {repeats} rounds of {steps} steps)",
                 ["stage", "ms", "% of trainer step"], rows)
    line = ", ".join(f"{k} {100 * v / per_step:.0f}%" for k, v in parts.items() if k != "between")
    print(f"profile line: {args.model} batch {bs}: {per_step * 1e3:.2f} ms/step = {line}")
    print(rounds)
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        model, opt, loss_fn = make()
        t = Trainer(model, opt, loss_fn, train_data=TensorData(data.x[: 50 * bs], data.y[: 50 * bs], data.input_scale),
                    batch_size=bs, progress=False, quiet=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t.fit(1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(f"\nwrote {common.write_rows('profile_' + args.model, [dict(zip(['stage', 'ms', 'pct'], r)) for r in rows])}")


if __name__ == "__main__":
    main()
