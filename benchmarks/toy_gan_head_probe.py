"""Can DMD2's GAN head tell real toy images from the demo student's within the demo's budget?

Why: with ``method.gan_head`` on, the demo's training logs ``gan_real`` / ``gan_fake`` of 0.500 / 0.500 after
hundreds of fake-score updates -- the head is at chance, so its generator term pushes G along a random direction
of the fake score's features.  This probe isolates the head: it builds the demo's recipe with the head on,
freezes everything else, and trains ONLY the head (Adam, ``--lr``) on fresh batches of real images against the
student's own samples (at initialisation: the teacher's weights, the recipe's stochastic backward simulation),
each noised at one fixed time ``--time`` (native units), printing the loss and the accuracy of the head's sign.
A head that cannot separate them here, with nothing else moving, cannot do it inside the demo either.

    .venv/bin/python benchmarks/toy_gan_head_probe.py --lr 1e-3 --time 0.1
    .venv/bin/python benchmarks/toy_gan_head_probe.py --lr 1e-3 --time 0.1 --set "method.gan_head.depths=[0.99]"
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F

from senseflow import api
from senseflow.config import load_config
from senseflow.toy.demo import RECIPES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the head")
    p.add_argument("--time", type=float, default=0.1, help="native noise time of every classified latent")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="seed of the classified latents' noise")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (e.g. the tap)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(RECIPES / "senseflow.yaml",
                             [f"paths.output={tmp}/run", "train.progress=false", "train.steps=1", "train.num_samples=0",
                              "train.tensorboard=false", "method.gan_head.enabled=true", *args.set])
        trainer = api.build_trainer(config, resume="never")
    method = trainer.method
    fake_score, rng = method.models.fake_score, trainer.rng
    head, schedule = fake_score.gan_head, fake_score.schedule
    fake_score.backbone.requires_grad_(False)  # only the head learns: no backward into the trunk (same head grads)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    noise = torch.Generator().manual_seed(args.seed)  # the trainer's own streams seed the rest: reruns repeat
    for step in range(args.steps + 1):
        batch = trainer.data.next_batch()
        with torch.no_grad():
            fake = method.iteration_sample("fake_score", batch, rng).float()
        method.phases(1)  # forget this iteration's cached G sample: the next batch draws its own
        t = torch.full((fake.shape[0],), args.time)

        def logits(x: torch.Tensor) -> torch.Tensor:
            eps = torch.randn(x.shape, generator=noise, dtype=x.dtype)
            return head.logits(fake_score, schedule.add_noise(x, eps, t), t, batch.cond, None)

        real_logits, fake_logits = logits(batch.latents.float()), logits(fake)
        loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()  # DMD2's classifier loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.report_every == 0:
            acc = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()).item()
            print(f"lr {args.lr:g} time {args.time:g} {' '.join(args.set)} step {step}: loss {loss.item():.4f} "
                  f"accuracy {acc:.3f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
