"""Open a Hugging Face model directory: check it, read its ModelSpec, and stream its weights.

Every problem a user can have with a checkpoint path (wrong path, missing or broken files, a dtype the
device cannot run) is found here, before any GPU memory is touched, and raised as a ModelConfigError
that says what to fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from kvrelay.core.model_files import ModelConfigError, read_json
from kvrelay.ranks.engine.sharding import TPShard
from kvrelay.ranks.engine.spec import ModelSpec
from kvrelay.core.tokenizer import tokenizer_file

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_model_dir(path: str | Path, with_weights: bool = True) -> tuple[ModelSpec, list[Path]]:
    """The spec of the model in `path` and its safetensors files, in the order to load them
    (none, and none looked for, without `with_weights`)."""
    path = Path(path)
    if not path.exists():
        raise ModelConfigError(f"model path {path} does not exist; give the path of a Hugging Face model directory")
    if not path.is_dir():
        raise ModelConfigError(
            f"model path {path} is not a directory; give the directory that holds config.json"
        )
    if not (path / "config.json").is_file():
        raise ModelConfigError(f"{path} has no config.json; is it a Hugging Face model directory?")
    config = read_json(path / "config.json")
    generation = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else None
    spec = ModelSpec.from_hf_config(config, generation)
    files = _weight_files(path) if with_weights else []
    tokenizer_file(path)
    return spec, files


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelConfigError(f"{index} has no weight_map; restore it from the original checkpoint")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelConfigError(
                f"{index} names shard(s) {', '.join(missing)} that are missing from {path}; "
                "the download is incomplete, fetch the missing files"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(
            f"{path} has no *.safetensors weights; kvrelay reads only safetensors "
            "(convert .bin or .pth weights with transformers' save_pretrained(safe_serialization=True))"
        )
    return files


def iter_weights(
    files: list[Path], dtype: torch.dtype, device: torch.device | str, shard: TPShard | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor on `device`) for every weight, one at a time, so host memory holds one tensor.

    With `shard` (a tensor-parallel rank's), only its slice of each tensor is read from the file, so
    a rank's host memory holds a slice of one tensor at a time and the rank reads about 1/tp of the
    checkpoint. Floating-point tensors come converted to `dtype`; others (rare integer buffers) keep theirs.
    """
    for file in files:
        # Opening on the target device reads straight into it, without a host copy of the whole file.
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                cut = shard.slice_of(name) if shard is not None else None
                if cut is None:
                    t = f.get_tensor(name)
                else:
                    dim, start, stop = cut
                    t = f.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]
                yield name, t.to(dtype) if t.is_floating_point() else t


def shard_weights(
    weights: Iterable[tuple[str, torch.Tensor]], shard: TPShard
) -> Iterator[tuple[str, torch.Tensor]]:
    """A rank's slices of whole tensors already in memory (random benchmark weights, a test's state
    dict): the same cuts as iter_weights makes in the files."""
    for name, t in weights:
        cut = shard.slice_of(name)
        yield name, t if cut is None else t.narrow(cut[0], cut[1], cut[2] - cut[1])


def check_dtype(dtype_name: str, device: torch.device | str, spec: ModelSpec) -> torch.dtype:
    """The torch dtype to run in. "auto" is the checkpoint's own dtype on CUDA and float32 on CPU."""
    device = torch.device(device)
    name = dtype_name
    if name == "auto":
        name = spec.torch_dtype.removeprefix("torch.") if device.type == "cuda" else "float32"
        if name not in DTYPES:
            raise ModelConfigError(
                f"config.json's torch_dtype {spec.torch_dtype!r} is not one kvrelay runs; "
                f"set dtype to one of {', '.join(DTYPES)}"
            )
    if name not in DTYPES:
        raise ModelConfigError(f"unknown dtype {dtype_name!r}; use one of auto, {', '.join(DTYPES)}")
    # Emulated bfloat16 (pre-Ampere cards) runs, but far slower than float16, so it counts as missing.
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ModelConfigError(
            f"{torch.cuda.get_device_name(device)} does not support bfloat16; set dtype to float16 or float32"
        )
    if name == "float16" and device.type == "cpu":
        raise ModelConfigError("float16 is too slow and imprecise on CPU; set dtype to float32 or bfloat16")
    return DTYPES[name]
