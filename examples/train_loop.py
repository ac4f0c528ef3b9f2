"""A plain training loop for examples/train_jpeg.py, and the same loop with a tuned plan.

The change a user makes (everything else in their loop stays):

      model = train_jpeg.build_model()
      optimizer = make_optimizer(model.parameters())
      dataset = train_jpeg.train_dataset()
    - loader = DataLoader(dataset, batch_size=32, shuffle=True, drop_last=True)
    + plan = autotiacc.training.load_training_plan("runs/train_jpeg/plan.json")
    + model, optimizer, loader, step = autotiacc.training.apply(plan, model, optimizer, dataset,
    +                                                           train_jpeg.loss_fn)
      for epoch in range(epochs):
          for batch in loader:
    -         optimizer.zero_grad()
    -         loss = train_jpeg.loss_fn(model, batch)
    -         loss.backward()
    -         optimizer.step()
    +         loss = step(batch)

Run: `python examples/train_loop.py [--train FILE] [--plan runs/x/plan.json] [--epochs 2]`
(FILE: any train.py following the contract, default examples/train_jpeg.py); prints one JSON
line with samples/s (steady: after the first WARMUP_STEPS steps; end-to-end: from before
`apply`, cache building included) and the final loss.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

WARMUP_STEPS = 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default=None, help="a training plan.json; none = the plain loop")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train", default=str(Path(__file__).resolve().parent / "train_jpeg.py"))
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("user_train", args.train)
    train_jpeg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_jpeg)
    batch_size = getattr(train_jpeg, "batch_size", 32)
    make_optimizer = getattr(train_jpeg, "make_optimizer", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    torch.manual_seed(0)
    model = train_jpeg.build_model()
    optimizer = make_optimizer(model.parameters())
    dataset = train_jpeg.train_dataset()
    t_start = time.perf_counter()
    if args.plan is None:
        torch.manual_seed(0)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)

        def step(batch):
            optimizer.zero_grad()
            loss = train_jpeg.loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            return loss.detach()
    else:
        import autotiacc.training

        plan = autotiacc.training.load_training_plan(args.plan)
        hooks = {}
        if plan.config.data.decode == "device":  # the plan decodes JPEG on the device: encoded items + transform
            hooks = {"raw_dataset": train_jpeg.raw_dataset(), "device_transform": train_jpeg.device_transform}
        model, optimizer, loader, step = autotiacc.training.apply(plan, model, optimizer, dataset,
                                                                  train_jpeg.loss_fn, **hooks)
    n, steps, losses, t_steady = 0, 0, [], None
    for _ in range(args.epochs):
        for batch in loader:
            loss = step(batch)
            losses.append(float(loss))
            steps += 1
            if steps == WARMUP_STEPS:
                t_steady = time.perf_counter()
            elif steps > WARMUP_STEPS:
                n += batch_size
    t_end = time.perf_counter()
    total = steps * batch_size
    print(json.dumps({"plan": args.plan, "steady_samples_per_s": n / (t_end - t_steady),
                      "end_to_end_samples_per_s": total / (t_end - t_start),
                      "final_loss": sum(losses[-4:]) / 4, "finite": all(map(lambda x: x == x and abs(x) < float("inf"), losses)),
                      "steps": steps}))


if __name__ == "__main__":
    main()
