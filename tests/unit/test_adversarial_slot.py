"""The adversarial slot: G's adversarial term moves G, never the discriminator."""

import torch
from torch import nn

from senseflow.config import OptimizerConfig, TrainConfig
from senseflow.discriminators import AdversarialTerm, hinge_discriminator_loss, hinge_generator_loss
from senseflow.methods import SenseFlow, SenseFlowConfig
from senseflow.methods.base import Batch, LossOutput
from senseflow.rng import RandomStreams
from senseflow.train.trainer import Trainer
from tests.helpers.models import PROMPTS, tiny_models


class PixelDiscriminator(AdversarialTerm):
    """A frozen random 'backbone' plus a trainable head, like the VFM discriminator in miniature."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
        self.head = nn.Conv2d(4, 1, 1)

    def logits(self, x):
        return self.head(torch.relu(self.backbone(x)))

    def generator_loss(self, x0, batch):
        return hinge_generator_loss(self.logits(x0))

    def discriminator_loss(self, x0_fake, batch):
        real = torch.zeros_like(x0_fake)  # stands in for real images
        loss = hinge_discriminator_loss(self.logits(real), self.logits(x0_fake.detach()))
        return LossOutput(loss, {"loss_d": loss.detach()})


def test_hinge_signs():
    assert hinge_discriminator_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0
    assert hinge_discriminator_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == 2.0
    assert hinge_generator_loss(torch.tensor([[3.0, 1.0]])).tolist() == [-2.0]


def test_generator_step_leaves_discriminator_untouched(tmp_path):
    models = tiny_models()
    models.discriminator = PixelDiscriminator()
    # D trains on G's own sample (fake_sample: generator); with the released time weight, a sample from
    # the first anchor has omega = 0 and D would (correctly) not move, so this test weighs D's loss by 1
    method = SenseFlow(models, SenseFlowConfig(adversarial_weight=0.5, ttur=1, isg_weight=0.0,
                                               discriminator_time_weight=False))
    assert list(method.networks()) == ["generator", "fake_score", "discriminator"]
    assert method.phases(0) == ["generator", "fake_score", "discriminator"]
    opt = OptimizerConfig(lr=1e-3)
    trainer = Trainer(method, None, TrainConfig(batch_size=4, progress=False, tensorboard=False),
                      {"generator": opt, "fake_score": opt, "discriminator": opt}, tmp_path, RandomStreams(0),
                      torch.device("cpu"))
    # only the head is in the discriminator's optimiser
    d_params = trainer.optimizers["discriminator"].param_groups[0]["params"]
    assert len(d_params) == 2 and all(p is q for p, q in zip(d_params, models.discriminator.head.parameters()))
    batch = Batch(PROMPTS, models.teacher.adapter.encode_prompts(PROMPTS))
    d_before = {k: v.clone() for k, v in models.discriminator.state_dict().items()}
    g_before = [p.clone() for p in models.generator.parameters()]
    logs = trainer.run_phase("generator", batch)
    assert "loss_adv_g" in logs
    for k, v in models.discriminator.state_dict().items():
        assert torch.equal(v, d_before[k])
    assert all(p.grad is None for p in models.discriminator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(g_before, models.generator.parameters()))
    trainer.run_phase("discriminator", batch)
    assert not torch.equal(models.discriminator.head.weight, d_before["head.weight"])
    assert torch.equal(models.discriminator.backbone.weight, d_before["backbone.weight"])


def test_adversarial_term_is_weighted_by_omega_at_the_input_anchor():
    models = tiny_models()
    models.discriminator = PixelDiscriminator()
    method = SenseFlow(models, SenseFlowConfig(adversarial_weight=1.0))

    class Gin:
        t = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8)
    per = models.discriminator.generator_loss(x, None)
    got = method.adversarial_loss(Gin, x, None)
    assert torch.allclose(got, (per * torch.tensor([0.0, 0.25])).mean())


def test_adversarial_start_keeps_the_term_out_of_g_until_then_while_d_trains():
    models = tiny_models()
    models.discriminator = PixelDiscriminator()
    method = SenseFlow(models, SenseFlowConfig(adversarial_weight=0.5, ttur=1, isg_weight=0.0, adversarial_start=3,
                                               discriminator_time_weight=False))
    batch = Batch(PROMPTS, models.teacher.adapter.encode_prompts(PROMPTS))
    for iteration, expected in [(0, False), (2, False), (3, True), (7, True)]:
        assert "discriminator" in method.phases(iteration)  # D trains from the first iteration
        logs = method.loss("generator", batch, RandomStreams(iteration)).logs
        assert ("loss_adv_g" in logs) is expected, iteration
