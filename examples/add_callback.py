"""User story 1: an existing LightningModule gets a compact low-rank model from one added line.

A small CNN learns scikit-learn's bundled 8x8 digits at full size while the callback projects
every conv onto a quarter of its rank after each epoch (LRPET); at fit end the weights are
exactly low rank, the compression report is printed (and saved under outputs/), and each conv
becomes two thin ones.
Run: ``python examples/add_callback.py`` (under 30 s on 2 CPU cores).
"""
import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrpet_lightning import LowRankProjectionCallback, decomposed_ranks


class DigitsCNN(L.LightningModule):  # the user's module: nothing LRPET-specific in it
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


X, y = load_digits(return_X_y=True)
x_tr, x_te, y_tr, y_te = train_test_split(X / 16, y, test_size=0.25, random_state=0)


def loader(x, y, shuffle=False):
    data = TensorDataset(torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y))
    return DataLoader(data, batch_size=64, shuffle=shuffle)


L.seed_everything(0)
model = DigitsCNN()
trainer = L.Trainer(
    max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False,
    default_root_dir="outputs/add_callback",  # where compression_report.json goes
    callbacks=[LowRankProjectionCallback(rank_ratio=0.25, decompose_on_fit_end=True)],  # + 1 line
)
trainer.fit(model, loader(x_tr, y_tr, shuffle=True))  # prints the compression report at the end
print("thin layers (name: rank):", decomposed_ranks(model))
(result,) = trainer.test(model, loader(x_te, y_te), verbose=False)
print(f"compact model test accuracy: {result['test_acc']:.3f}")
