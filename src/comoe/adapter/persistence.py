"""Saving and loading a ComoeModel's adapter as a folder (adapter_config.json, adapter_model.safetensors,
README.md model card) and pushing it to the Hub: the persistence half of the ComoeModel facade."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from huggingface_hub import HfApi
from torch import nn

from comoe.adapter.card import write_model_card
from comoe.adapter.folder import AdapterFolder, adapter_folder
from comoe.adapter.injection import expected_shapes
from comoe.adapter.serialization import (
    check_fits,
    full_tensor,
    load_weights_into,
    save_config,
    save_weights,
    tensor_shapes,
)


class AdapterPersistenceMixin:
    """save_pretrained / from_pretrained / push_to_hub for a model with `adapter_state_dict()`,
    `comoe_config`, `card_notes` and `wrapped_model` (ComoeModel)."""

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
        **ignored: Any,
    ) -> None:
        """Write the adapter folder: adapter_config.json (with the base model's name and comoe's version),
        adapter_model.safetensors (experts and routers only) and a README.md model card.

        Takes the keywords transformers passes: `state_dict` (a state dict of this whole model, as Trainer
        gathers it: the adapter's entries are taken from it), `safe_serialization` (only True: comoe
        writes safetensors, never pickles), and ignores the rest (`max_shard_size`, `push_to_hub`, ...: an
        adapter is a few MB in one file). Under FSDP every process must call this (sharded experts are
        gathered); only the one with is_main_process writes, as in PEFT.
        """
        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False): comoe writes safetensors only")
        if state_dict is not None:
            state = {name: state_dict[f"wrapped_model.{name}"] for name in self.adapter_state_dict()}
        else:
            state = self.adapter_state_dict()
        state = {name: full_tensor(tensor) for name, tensor in state.items()}
        if not is_main_process:
            return
        os.makedirs(directory, exist_ok=True)
        save_weights(state, directory)
        save_config(self.comoe_config, directory, base_model_name_or_path=self.base_model_name_or_path)
        write_model_card(directory, self.comoe_config, self.base_model_name_or_path, self.card_notes)

    @property
    def base_model_name_or_path(self) -> str | None:
        """What the wrapped model was loaded from (its config's name_or_path), recorded in the adapter
        folder so that AutoComoeModelForCausalLM can load base and adapter from the folder alone."""
        config = getattr(self.wrapped_model, "config", None)
        return getattr(config, "_name_or_path", None) or None

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload comoe adapter",
        **ignored: Any,
    ) -> str:
        """Upload the adapter folder (never the base model) to a Hub model repository, creating it if
        needed; returns the commit URL."""
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model"
            )
        return str(commit)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: AdapterFolder | str | os.PathLike, is_trainable: bool = False
    ) -> Any:
        """Wrap `model` with the adapter saved in `directory` (a folder path, or an AdapterFolder already
        read; safetensors only, nothing is unpickled).

        The file's tensor names and shapes are checked against the config and the model before any expert
        is allocated, so a wrong or hostile config (num_experts = 10**9) fails at once, not in an allocation.
        """
        folder = adapter_folder(directory)
        config, weights = folder.comoe_config(), folder.weights
        check_fits(expected_shapes(model, config), tensor_shapes(weights), weights)
        comoe = cls(model, config, strict_objectives=is_trainable)
        comoe.load_adapter_weights(weights)
        if not is_trainable:
            comoe.eval()
            for param in comoe.parameters():
                param.requires_grad_(False)
        return comoe

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        """Load experts and routers from a safetensors file that must fit this model exactly."""
        load_weights_into(self.adapter_state_dict(), path)
