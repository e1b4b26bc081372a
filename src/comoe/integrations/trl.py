"""TRL's SFTTrainer with a comoe adapter.

SFTTrainer computes its loss from the backbone's hidden states with a fused LM head, bypassing the
model's forward. A ComoeModel computes its auxiliary losses on that backbone call, and ComoeTrainerMixin
adds them to SFTTrainer's loss; a plain SFTTrainer would train without them. Checkpoints are adapter
folders, as with ComoeTrainer.

    from comoe.integrations.trl import ComoeSFTTrainer
    ComoeSFTTrainer(model=comoe_model, args=SFTConfig(...), train_dataset=..., processing_class=tokenizer)
"""

from __future__ import annotations

from trl import SFTTrainer

from comoe.integrations.trainer import ComoeTrainerMixin


class ComoeSFTTrainer(ComoeTrainerMixin, SFTTrainer):
    """trl.SFTTrainer with comoe's auxiliary losses in its loss and adapter-folder checkpoints."""
