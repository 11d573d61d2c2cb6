"""Run by tests/engine/test_distributed.py under torchrun: `ddp_worker.py MODE OUTPUT_DIR`.

train: two optimizer iterations on FakeDetector, each rank on its half of every batch of 2;
       rank 1's second batch holds a NaN box. Each rank saves its final weights.
crash: rank 1's loader raises at iteration 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_fakes import FakeDetector, FakeStream, make_trainer  # noqa: E402

from frcnn.engine import distributed  # noqa: E402


def main(mode: str, output_dir: Path) -> None:
    torch.set_num_threads(1)
    device = distributed.init_distributed("cpu")
    rank, world = distributed.get_rank(), distributed.get_world_size()
    assert world == 2, world
    torch.manual_seed(0)
    model = distributed.wrap_ddp(FakeDetector(dropout=0.0), device)
    if mode == "train":
        stream = FakeStream(batch_size=2, shard=(rank, world), poisoned={2} if rank else set())
        trainer = make_trainer(output_dir, stream, model=model, max_iter=2, log_period=1)
    else:
        stream = FakeStream(batch_size=2, shard=(rank, world), crash_at=2 if rank else None)
        trainer = make_trainer(output_dir, stream, model=model, max_iter=50, log_period=1)
    trainer.train()
    torch.save(distributed.unwrap_model(model).state_dict(), output_dir / f"rank{rank}.pt")
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
