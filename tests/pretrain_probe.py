"""Runs pretrain.main() with test instrumentation, under torchrun or plain python.

PROBE_DIR=D  each process writes D/crops_rank{R}.txt (the (seed, epoch, index) key of every
             training crop it consumed) and D/weights_rank{R}.pt (its final parameters).
NOISELESS_GUMBEL=1  replaces the quantizer's Gumbel noise by its deterministic limit, so runs that
             split the same batch differently can be compared update for update.
"""

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pretrain  # noqa: E402
from utils.crops import CropStream  # noqa: E402

probe_dir = Path(os.environ["PROBE_DIR"])
rank = int(os.environ.get("RANK", 0))
captured = {}

if os.environ.get("NOISELESS_GUMBEL") == "1":

    def noiseless_gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
        soft = (logits / tau).softmax(dim)
        if not hard:
            return soft
        one_hot = torch.zeros_like(logits).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
        return one_hot - soft.detach() + soft

    torch.nn.functional.gumbel_softmax = noiseless_gumbel_softmax

original_iter = CropStream.__iter__


def recording_iter(self):
    for batch in original_iter(self):
        if not self.fixed:
            with open(probe_dir / f"crops_rank{rank}.txt", "a") as f:
                f.writelines(" ".join(map(str, key)) + "\n" for key in batch["crop_keys"].tolist())
        yield batch


CropStream.__iter__ = recording_iter
original_prepare = Accelerator.prepare
original_end = Accelerator.end_training


def prepare(self, *objects, **kwargs):
    prepared = original_prepare(self, *objects, **kwargs)
    captured["model"] = self.unwrap_model(prepared[0])  # not the DDP wrapper, which must die before the process group
    return prepared


def end_training(self):
    state = {k: v.detach().cpu().clone() for k, v in captured["model"].state_dict().items()}
    torch.save(state, probe_dir / f"weights_rank{rank}.pt")
    original_end(self)


Accelerator.prepare = prepare
Accelerator.end_training = end_training

if __name__ == "__main__":
    probe_dir.mkdir(parents=True, exist_ok=True)
    pretrain.main(sys.argv[1:])
