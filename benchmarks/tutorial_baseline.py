"""The seed tutorial's training loop, kept as the baseline that benchmarks compare against.

torchvision's MNIST dataset, ToTensor + Normalize, a shuffling DataLoader at batch 64, and a
test pass after every epoch, as in the tutorial; only its loss bug is fixed (it divided the
sum of per-batch mean losses by the number of samples).

Usage: python benchmarks/tutorial_baseline.py DATA_DIR [EPOCHS]  (DATA_DIR holds the IDX files)
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn, optim
from torchvision import datasets, transforms


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(784, 520)
        self.l2 = nn.Linear(520, 320)
        self.l3 = nn.Linear(320, 240)
        self.l4 = nn.Linear(240, 120)
        self.l5 = nn.Linear(120, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 784)
        x = F.relu(self.l1(x))
        x = F.relu(self.l2(x))
        x = F.relu(self.l3(x))
        x = F.relu(self.l4(x))
        return self.l5(x)


def main(data_dir: Path, epochs: int) -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        # torchvision looks for the raw files in <root>/MNIST/raw.
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for file in data_dir.iterdir():
            shutil.copy(file, raw / file.name)
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        train_dataset = datasets.MNIST(root, train=True, transform=transform)
        test_dataset = datasets.MNIST(root, train=False, transform=transform)
        train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=64, shuffle=True)
        test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=64, shuffle=False)

        torch.manual_seed(1)
        model = Net()
        optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
        for epoch in range(1, epochs + 1):
            model.train()
            for data, target in train_loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(data), target)
                loss.backward()
                optimizer.step()
            model.eval()
            test_loss, correct = 0.0, 0
            with torch.no_grad():
                for data, target in test_loader:
                    output = model(data)
                    test_loss += F.cross_entropy(output, target, reduction="sum").item()
                    correct += (output.argmax(1) == target).sum().item()
            n = len(test_dataset)
            print(f"epoch {epoch}: test loss {test_loss / n:.4f}, accuracy {correct / n:.4f}", flush=True)
    print(f"wall {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 9)
