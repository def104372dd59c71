import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dml_cli.engine import DMLTrainer, NonFiniteLossError, TrainingInterrupted
from dml_cli.losses import pairwise_kl_reference


class CountingNet(nn.Module):
    def __init__(self, in_features=6, num_classes=3):
        super().__init__()
        self.linear = nn.Linear(in_features, 8)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(8, num_classes)
        self.calls = 0
        self.modes_seen = []

    def forward(self, x):
        self.calls += 1
        self.modes_seen.append(self.training)
        return self.head(self.dropout(torch.relu(self.linear(x))))


def make_batches(num_batches=4, batch_size=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        images = torch.randn(batch_size, 6, generator=generator)
        labels = torch.randint(0, 3, (batch_size,), generator=generator)
        batches.append((images, labels))
    return batches


def make_trainer(cohort_size=3, seed=0, lr=0.1, **kwargs):
    torch.manual_seed(seed)
    students = [CountingNet() for _ in range(cohort_size)]
    optimizers = [torch.optim.SGD(s.parameters(), lr=lr, momentum=0.9) for s in students]
    return DMLTrainer(students, optimizers, **kwargs)


@pytest.mark.parametrize("cohort_size", [1, 2, 3, 4])
def test_simultaneous_k_forward_passes(cohort_size):
    trainer = make_trainer(cohort_size)
    batches = make_batches(num_batches=3)

    trainer.train_epoch(batches)

    for student in trainer.students:
        assert student.calls == 3
    assert trainer.forward_passes == 3 * cohort_size


@pytest.mark.parametrize("cohort_size", [1, 2, 3, 4])
def test_sequential_at_most_2k_minus_1(cohort_size):
    trainer = make_trainer(cohort_size, update="sequential")
    batches = make_batches(num_batches=3)

    trainer.train_epoch(batches)

    assert trainer.forward_passes <= 3 * (2 * cohort_size - 1)
    assert trainer.forward_passes == 3 * (2 * cohort_size - 1)


def test_train_mode_after_validation():
    trainer = make_trainer(2)
    batches = make_batches()

    trainer.fit(batches, batches, epochs=3)

    for student in trainer.students:
        # Each epoch: 4 training forwards, then 4 validation forwards in eval mode.
        assert len(student.modes_seen) == 3 * 8
        for epoch in range(3):
            seen = student.modes_seen[epoch * 8 : epoch * 8 + 8]
            assert seen[:4] == [True] * 4
            assert seen[4:] == [False] * 4
        assert student.training


def test_simultaneous_step_matches_manual_update():
    trainer = make_trainer(3, lr=0.1, temperature=2.0, mimicry_weight=0.7)
    for student in trainer.students:
        student.dropout.p = 0.0
    manual = [copy.deepcopy(student) for student in trainer.students]
    images, labels = make_batches(num_batches=1)[0]

    trainer.train_epoch([(images, labels)])

    logits = [student(images) for student in manual]
    kl = pairwise_kl_reference(torch.stack(logits), temperature=2.0)
    for k, student in enumerate(manual):
        loss = F.cross_entropy(logits[k], labels) + 0.7 * kl[k]
        grads = torch.autograd.grad(loss, list(student.parameters()), retain_graph=True)
        for parameter, grad, trained in zip(
            student.parameters(), grads, trainer.students[k].parameters(), strict=True
        ):
            assert torch.allclose(parameter - 0.1 * grad, trained, atol=1e-6)


def test_sequential_mimics_updated_peer():
    trainer = make_trainer(2, lr=0.5, update="sequential")
    for student in trainer.students:
        student.dropout.p = 0.0
    manual = [copy.deepcopy(student) for student in trainer.students]
    images, labels = make_batches(num_batches=1)[0]

    trainer.train_epoch([(images, labels)])

    def step(k, peer_logits):
        logits = manual[k](images)
        stacked = torch.stack([logits, peer_logits.detach()])
        loss = F.cross_entropy(logits, labels) + pairwise_kl_reference(stacked)[0]
        grads = torch.autograd.grad(loss, list(manual[k].parameters()))
        with torch.no_grad():
            for parameter, grad in zip(manual[k].parameters(), grads, strict=True):
                parameter -= 0.5 * grad

    step(0, manual[1](images))
    step(1, manual[0](images))
    for k in range(2):
        for expected, trained in zip(
            manual[k].parameters(), trainer.students[k].parameters(), strict=True
        ):
            assert torch.allclose(expected, trained, atol=1e-6)


def test_resume_equals_straight_training():
    batches = make_batches(num_batches=4)
    straight = make_trainer(3, seed=1)
    straight.fit(batches, batches, epochs=4)

    first = make_trainer(3, seed=1)
    first.fit(batches, batches, epochs=2)
    state = copy.deepcopy(first.state_dict())
    # Disturb the global generator, as a new process would, before restoring.
    torch.manual_seed(12345)
    resumed = make_trainer(3, seed=99)
    resumed.load_state_dict(state)
    resumed.fit(batches, batches, epochs=4)

    for a, b in zip(straight.students, resumed.students, strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb)
    strip = [{k: v for k, v in row.items() if k != "time_s"} for row in straight.history]
    strip_resumed = [{k: v for k, v in row.items() if k != "time_s"} for row in resumed.history]
    assert strip == strip_resumed


def test_best_tracks_highest_val_acc():
    trainer = make_trainer(2)
    batches = make_batches()

    trainer.fit(batches, batches, epochs=3)

    for k, name in enumerate(trainer.names):
        accs = [row["val_acc"] for row in trainer.history if row["student"] == name]
        assert trainer.best_val_acc[k] == max(accs)
        assert trainer.best_epoch[k] == accs.index(max(accs)) + 1
        assert trainer.best_states[k] is not None


def test_non_finite_loss_names_student():
    trainer = make_trainer(2, log_every_steps=1)
    with torch.no_grad():
        trainer.students[1].head.bias.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="student_1 at epoch=1 step=1"):
        trainer.train_epoch(make_batches())


def test_stop_signal_stops_after_step():
    trainer = make_trainer(2)

    class StopAfterTwo:
        def __call__(self, trainer):
            if trainer.step == 2:
                trainer.stop_signal = 2

    with pytest.raises(TrainingInterrupted):
        trainer.train_epoch(make_batches(), on_step=StopAfterTwo())
    assert trainer.step == 2
    assert trainer.epoch_state.batches_done == 2


def test_interrupted_epoch_resumes_exactly():
    batches = make_batches(num_batches=4)
    straight = make_trainer(2, seed=3)
    straight_means = straight.train_epoch(batches)

    interrupted = make_trainer(2, seed=3)

    def stop(trainer):
        if trainer.step == 2:
            trainer.stop_signal = 15

    with pytest.raises(TrainingInterrupted):
        interrupted.train_epoch(batches, on_step=stop)
    state = copy.deepcopy(interrupted.state_dict())
    resumed = make_trainer(2, seed=7)
    resumed.load_state_dict(state)
    means = resumed.train_epoch(batches)

    for name in straight.names:
        assert means[name] == pytest.approx(straight_means[name], abs=1e-6)
    for a, b in zip(straight.students, resumed.students, strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, r"temperature=0.0 \(loss.temperature\)"),
        ({"mimicry_weight": -1.0}, r"mimicry_weight=-1.0 \(loss.mimicry_weight\)"),
        ({"update": "parallel"}, r"update='parallel' \(loss.update\): choose one of simult"),
        ({"mimicry": "mean"}, r"mimicry='mean' \(loss.mimicry\)"),
        ({"precision": "8"}, r"precision='8' \(trainer.precision\): choose one of 32, bf16"),
    ],
)
def test_invalid_loss_settings_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(2, **kwargs)


def test_mismatched_optimizers_rejected():
    students = [CountingNet(), CountingNet()]
    optimizer = torch.optim.SGD(students[0].parameters(), lr=0.1)

    with pytest.raises(ValueError, match="1 optimizers for 2 students"):
        DMLTrainer(students, [optimizer])
    with pytest.raises(ValueError, match="empty"):
        DMLTrainer([], [])
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        DMLTrainer([students[0], "net"], [optimizer, optimizer])
