"""TRL's SFTTrainer with a comoe adapter.

SFTTrainer computes its loss from the backbone's hidden states with a fused LM head, bypassing the
model's forward. A ComoeModel computes its auxiliary losses on that backbone call and carries their
gradient on the backbone's output (adapter/aux_gradient.py), so even a plain SFTTrainer trains with them
(exactly, with one micro-batch per optimizer step). ComoeSFTTrainer adds what needs the trainer: the
auxiliary gradient averaged over accumulated micro-batches, the losses reported in `loss` and as
`task`/`balance`/`contrastive`, and adapter-folder checkpoints, as with ComoeTrainer.

    from comoe.integrations.trl import ComoeSFTTrainer
    ComoeSFTTrainer(model=comoe_model, args=SFTConfig(...), train_dataset=..., processing_class=tokenizer)
"""

from __future__ import annotations

from trl import SFTTrainer

from comoe.integrations.trainer import ComoeTrainerMixin


class ComoeSFTTrainer(ComoeTrainerMixin, SFTTrainer):
    """trl.SFTTrainer with comoe's loss components logged, the auxiliary gradient averaged over
    accumulated micro-batches, and adapter-folder checkpoints."""
