"""One process of a transformers Trainer run on a tiny comoe model (launched by test_trainer_ddp.py, under
torchrun or alone): one SGD step on copies of one row, the adapter saved to OUTPUT/adapter.safetensors.

    python tests/integrations/trainer_ddp_worker.py OUTPUT BATCH_PER_PROCESS TRAINER LABEL_SMOOTHING
"""

import sys

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from comoe.adapter.model import get_comoe_model
from comoe.config import ComoeConfig
from comoe.integrations.trainer import ComoeTrainer
from tests.helpers import tiny_llama, trainer_fields


def main() -> None:
    output, batch, trainer_name, smoothing = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    base = tiny_llama(seed=0)
    torch.manual_seed(0)
    config = ComoeConfig.preset("comoe", r=4, lora_dropout=0.0, contrastive_weight=0.5)
    model = get_comoe_model(base, config)
    for layer in model.comoe_layers().values():  # experts off B = 0: a contrastive gradient that counts
        torch.nn.init.normal_(layer.lora_B, std=0.05, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    row = {"input_ids": ids[0].tolist(), "attention_mask": [1] * 12, "labels": labels[0].tolist()}
    fields = trainer_fields(
        output,
        max_steps=1,
        per_device_train_batch_size=batch,
        optim="sgd",
        learning_rate=0.1,
        save_strategy="no",
        label_smoothing_factor=smoothing,
    )
    trainer_class = {"Trainer": Trainer, "ComoeTrainer": ComoeTrainer}[trainer_name]
    trainer = trainer_class(
        model=model, args=TrainingArguments(**fields), train_dataset=Dataset.from_list([row] * 4)
    )
    trainer.train()
    if trainer.args.process_index == 0:
        save_file(
            {k: v.detach().contiguous() for k, v in model.adapter_state_dict().items()},
            f"{output}/adapter.safetensors",
        )


if __name__ == "__main__":
    main()
