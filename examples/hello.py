"""layerwise's hello world: an 8-layer MLP split into 4 pipeline stages on 4 CPU processes.

    python examples/hello.py                         # starts 4 local processes by itself
    torchrun --nproc-per-node 4 examples/hello.py    # or let torchrun start them
"""

import torch

import layerwise


def train() -> float:
    torch.manual_seed(0)  # every rank builds the same model and draws the same batches
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh()) for _ in range(8)])
    pipe = layerwise.Pipeline(model, stages=4, loss_fn=torch.nn.functional.mse_loss, optimizer=torch.optim.Adam)
    for step in range(300):
        x = torch.randn(32, 64)
        loss = pipe.step(x, x.flip(1).tanh())  # learn to reverse (and squash) the features
        if step % 100 == 0 and pipe.rank == 0:
            print(f"step {step}: loss {loss:.4f}")
    return loss


if __name__ == "__main__":
    print("final loss per rank:", layerwise.run(train, nprocs=4))
