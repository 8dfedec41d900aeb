"""Merge a LoRA adapter into its base LVLM and save the result in the HF format vLLM serves.

    merge_adapter("llava-hf/llava-1.5-7b-hf", "runs/dpo/adapter", "runs/dpo/merged")

`merge_and_unload` folds B @ A * alpha / r into the base weights, so the merged folder is a plain
checkpoint of the base architecture (safetensors, config, processor files): no PEFT needed to load it.
A model loaded from a hub-layout checkpoint is saved back in that layout by transformers (vLLM rejects
transformers 5's flattened vision-tower names; measured by the vLLM test of the merged model).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pyarrow import fs as pafs

from synthalign_ray import store


def upload_dir(local: str, uri: str) -> None:
    """Copy a local folder to a local path or URI (s3://, gs://), replacing what is there."""
    fs, path = store.filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def merge_adapter(base_model: str, adapter: str, output: str, dtype: str = "auto") -> str:
    """Load the base (a local folder, or a hub id: `org/name@REV` loads that revision), apply the adapter
    folder, merge, save to OUTPUT (a local folder or URI) with the processor; returns OUTPUT. The
    processor comes from the adapter folder if it has one (training saves it there), else from the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from synthalign_ray.base import pretrained_source

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    source, pinned = pretrained_source(base_model)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype, **pinned)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    has_processor = (Path(adapter) / "processor_config.json").is_file() or (Path(adapter) / "preprocessor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(adapter) if has_processor else AutoProcessor.from_pretrained(source, **pinned)
    if "://" not in output:
        merged.save_pretrained(output)
        processor.save_pretrained(output)
        return output
    with tempfile.TemporaryDirectory(prefix="synthalign-merge-") as local:
        merged.save_pretrained(local)
        processor.save_pretrained(local)
        upload_dir(local, output)
    return output


def copy_tree(local: str, dest: str) -> None:
    """A local folder to a local folder (replaced) or URI."""
    if "://" in dest:
        upload_dir(local, dest)
        return
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(local, dest)
