"""The hello world on a mesh: a GPT built on the meta device, 2 pipeline stages x 2 data-parallel
replicas (FSDP2), checked against the same model trained in one process.

    python examples/hello_mesh.py                                   # starts 4 local processes
    torchrun --nproc-per-node 4 examples/hello_mesh.py              # or let torchrun start them
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 examples/hello_mesh.py           # on each of two machines
"""

import torch

import layerwise
from layerwise.models import GPT, GPTConfig, lm_loss

CFG = GPTConfig(vocab=64, context=16, width=32, heads=4, blocks=4)


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)  # counting sequences from random starts: learnable
    starts = [torch.randint(0, CFG.vocab, (8, 1), generator=g) for _ in range(steps)]
    tokens = [(s + torch.arange(CFG.context + 1)) % CFG.vocab for s in starts]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def train(steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    with torch.device("meta"):  # each rank materializes only its own layers
        model = GPT(CFG)
    pipe = layerwise.Pipeline(model, stages=2, dp=2, loss_fn=lm_loss, microbatches=2,
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    return [pipe.step(x, y) for x, y in batches(steps)]


def reference(steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for x, y in batches(steps):
        opt.zero_grad()
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    import os

    result = layerwise.run(train, nprocs=4)  # a list per rank when it started them, else this rank's
    losses = result if "RANK" in os.environ else result[0]
    if int(os.environ.get("RANK", "0")) == 0:
        ref = reference()
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; one process: {ref[0]:.4f} -> {ref[-1]:.4f}; "
              f"largest difference {max(abs(a - b) for a, b in zip(losses, ref)):.2e}")
