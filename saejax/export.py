"""Write and read SAEs in SAELens's on-disk format (a folder with two files).

    out_dir/sae_weights.safetensors  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
                                     b_dec [d_in]
    out_dir/cfg.json                 the config ``sae_lens.SAE.load_from_disk(out_dir)`` reads

Matched against SAELens 6.x (``decoderesearch/SAELens``, formerly ``jbloomAus/SAELens``;
pyproject version 6.52.0 was the newest seen):

* ``sae_lens/constants.py``: ``SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"``,
  ``SAE_CFG_FILENAME = "cfg.json"``, ``DTYPE_MAP`` (cfg "dtype" must be one of its keys).
* ``sae_lens/saes/sae.py``: ``SAEConfig`` fields ``d_in, d_sae, dtype, device,
  apply_b_dec_to_input, normalize_activations, reshape_activations, metadata``;
  ``to_dict()`` adds ``"architecture"``; ``from_dict()`` keeps only dataclass fields of the
  architecture's config class (other top-level keys are ignored) and builds ``SAEMetadata`` from
  ``cfg["metadata"]``. ``load_from_disk`` loads the state dict *strictly* (exactly the four
  tensors above). ``process_sae_in``: ``x - b_dec * apply_b_dec_to_input``.
  ``fold_activation_norm_scaling_factor(s)``: ``W_enc *= s; W_dec /= s; b_dec /= s`` -- the fold
  used here.
* ``sae_lens/saes/standard_sae.py`` ("standard"): ``f = relu(sae_in @ W_enc + b_enc)``,
  ``x_hat = f @ W_dec + b_dec``.
* ``sae_lens/saes/topk_sae.py`` ("topk", extra fields ``k``, ``rescale_acts_by_decoder_norm``
  (default False)): ``TopK`` keeps the k largest pre-activations, ReLUs them, zeroes the rest.
* ``sae_lens/loading/pretrained_sae_loaders.py``: ``sae_lens_disk_loader``;
  ``handle_config_defaulting`` treats a cfg whose ``sae_lens_version`` (top level, or in
  ``metadata``; an earlier 6.x looked only at the top level, so both are written) is missing or
  < ``6.0.0-rc.0`` as the old *flat* format and rewrites it
  (``handle_pre_6_0_config``: ``hook_point -> hook_name``, ``activation_fn_kwargs["k"] -> k``,
  metadata rebuilt from the flat keys in ``LLM_METADATA_KEYS``). So the export stamps
  ``sae_lens_version = "6.0.0"`` as a *format* marker (it is not the SAELens that wrote it).

The export also mirrors the flat SAELens <= 5.x keys (``model_name``, ``hook_name``,
``hook_layer``, ``activation_fn_str``, ``activation_fn_kwargs``, ``context_size`` ...; the
required fields of 5.x ``sae_lens/sae.py: SAEConfig``) at the top level, so 5.x-era tooling can
read it; SAELens 6 drops them in ``from_dict``. Metadata keys SAELens does not know go in a
top-level ``"saejax"`` block, not in ``metadata``: the current ``SAEMetadata`` accepts any key,
but an earlier one was a fixed dataclass that raised on unknown keys.

Folding the input scale. saejax trains on xs = s*x. With params (W_enc, b_enc, W_dec, b_dec):
    f     = act((s*x - b_dec) @ W_enc + b_enc)
          = act((x - b_dec/s) @ (s*W_enc) + b_enc)
    so W_enc' = s*W_enc, b_dec' = b_dec/s, b_enc' = b_enc, and
    x_hat = xs_hat / s = (f @ W_dec + b_dec) / s = f @ (W_dec/s) + b_dec/s
    so W_dec' = W_dec/s with the same b_dec'.
The pre-activations, hence f (ReLU or top-k), are unchanged, so the exported SAE runs on raw x
with ``normalize_activations="none"`` and reconstructs x_hat_raw = xs_hat / s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy

from saejax.atomic import atomic_dir
from saejax.paths import AnyPath, as_path, is_url
from saejax.sae import FAMILIES, family_for_saelens, get_family
from saejax.sae.config import SAEConfig
from saejax.sweep import split_member

WEIGHTS_FILENAME = "sae_weights.safetensors"  # sae_lens/constants.py SAE_WEIGHTS_FILENAME
CFG_FILENAME = "cfg.json"  # sae_lens/constants.py SAE_CFG_FILENAME
SAELENS_FORMAT_VERSION = "6.0.0"  # first version of the nested-"metadata" cfg format
DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
# sae_lens/loading/pretrained_sae_loaders.py LLM_METADATA_KEYS (+ hook_layer, an older SAEMetadata field).
METADATA_KEYS = {
    "model_name", "hook_name", "model_class_name", "hook_layer", "hook_head_index",
    "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
    "context_size", "seqpos_slice", "dataset_path", "sae_lens_version",
    "sae_lens_training_version", "hook_name_out", "hook_head_index_out",
}
METADATA_ALIASES = {"dataset": "dataset_path", "hook_point": "hook_name"}


def saelens_architectures() -> list[str]:
    return sorted(f.saelens_architecture for f in FAMILIES.values() if f.saelens_architecture)


def _sizes(params: dict, axes: dict[str, tuple[str, ...]]) -> tuple[int, int]:
    """(d_in, d_sae) after checking every parameter the family declares against its logical
    axes; errors name the array and both shapes."""
    missing = [n for n in axes if n not in params]
    if missing:
        raise ValueError(f"params is missing {missing} (has {sorted(params)})")
    sizes: dict[str, tuple[int, str]] = {}  # axis -> (size, the parameter it was read from)
    for name, names in axes.items():
        shape = tuple(np.shape(params[name]))
        if len(shape) != len(names):
            raise ValueError(f"{name} must be {len(names)}-D {list(names)}, got shape {shape}")
        for axis, n in zip(names, shape):
            size, source = sizes.setdefault(axis, (n, name))
            if size != n:
                raise ValueError(f"{name} has shape {shape}, expected {axis}={size} "
                                 f"(from {source})")
    return sizes["d_in"][0], sizes["d_sae"][0]


def _split_metadata(metadata: dict | None) -> tuple[dict, dict]:
    """(SAELens metadata with defaults, other keys for the "saejax" block)."""
    meta = {"model_name": None, "hook_name": None, "hook_head_index": None, "context_size": None,
            "dataset_path": None, "prepend_bos": True, "model_from_pretrained_kwargs": {},
            "neuronpedia_id": None}
    extra = {}
    for key, value in (metadata or {}).items():
        key = METADATA_ALIASES.get(key, key)
        (meta if key in METADATA_KEYS else extra)[key] = value
    meta.update(sae_lens_version=SAELENS_FORMAT_VERSION, sae_lens_training_version=None)
    return meta, extra


def _hook_layer(meta: dict) -> int | None:
    if meta.get("hook_layer") is not None:
        return meta["hook_layer"]
    m = re.search(r"blocks\.(\d+)\.", meta.get("hook_name") or "")
    return int(m.group(1)) if m else None


def build_cfg(d_in: int, d_sae: int, *, architecture: str, options: dict, dtype: str,
              metadata: dict | None, input_scale: float = 1.0) -> dict:
    """The cfg.json dict: SAELens 6 fields, flat 5.x mirror, and the "saejax" block."""
    meta, extra = _split_metadata(metadata)
    hook_name = meta.get("hook_name") or ""
    cfg = {
        "architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": dtype,
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook_name.endswith("hook_z") else "none",
        "metadata": meta,
    }
    cfg.update(options)
    cfg.update({  # flat SAELens <= 5.x keys (ignored by SAELens 6)
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "model_name": meta["model_name"], "hook_name": meta["hook_name"],
        "hook_layer": _hook_layer(meta), "hook_head_index": meta["hook_head_index"],
        "activation_fn_str": {"standard": "relu"}.get(architecture, architecture),
        "activation_fn_kwargs": {"k": options["k"]} if "k" in options else {},
        "finetuning_scaling_factor": False, "context_size": meta["context_size"],
        "dataset_path": meta["dataset_path"], "dataset_trust_remote_code": True,
        "prepend_bos": meta["prepend_bos"], "sae_lens_training_version": None,
        "model_from_pretrained_kwargs": meta["model_from_pretrained_kwargs"],
        "neuronpedia_id": meta["neuronpedia_id"],
    })
    cfg["saejax"] = {"input_scale_folded": input_scale, **extra}
    return cfg


def check_destination(out_dir, overwrite: bool) -> AnyPath:
    """`out_dir` as an absolute path (a URL as it is), after refusing it when it is a file or a
    non-empty directory and `overwrite` is not set (the whole folder is replaced when it is)."""
    out_dir = as_path(out_dir) if is_url(out_dir) else Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        what = "is a file" if not out_dir.is_dir() else "exists and is not empty"
        raise FileExistsError(f"{out_dir} {what}; pass --overwrite to replace it, or choose "
                              f"another folder")
    return out_dir


def export_saelens(out_dir, params: dict[str, np.ndarray], *, architecture: str,
                   options: dict | None = None, input_scale: float = 1.0,
                   metadata: dict | None = None, dtype: str = "float32",
                   overwrite: bool = False) -> AnyPath:
    """Write `params` (trained on inputs scaled by `input_scale`) as a SAELens SAE for raw inputs.

    `architecture` names the family (`Family.saelens_architecture`), whose parameters are
    written and whose rule folds the input scale; `options` are its extra cfg.json keys
    (`Family.saelens_options`, e.g. {"k": 32}). Atomic: files go into a temp folder beside
    `out_dir`, are fsynced, and the folder is renamed into place. An existing non-empty `out_dir`
    is an error unless `overwrite=True`. `out_dir` may be a URL (gs://, s3://): the files are
    uploaded once written, cfg.json last (`saejax.atomic.atomic_dir`).
    """
    family = family_for_saelens(architecture)
    if family is None:
        raise ValueError(f"architecture must be one of {saelens_architectures()}, "
                         f"got {architecture!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    s = float(input_scale)
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"input_scale must be finite and > 0, got {input_scale}")
    d_in, d_sae = _sizes(params, family.param_axes)
    options = dict(options or {})
    allowed = set(family.saelens_options(SAEConfig(arch=family.name)))
    if set(options) - allowed:
        raise ValueError(f"{sorted(set(options) - allowed)} are not options of architecture "
                         f"{architecture!r} (it has {sorted(allowed)})")
    family.from_saelens(options)  # what a reader needs is there
    if "k" in options and (int(options["k"]) != options["k"] or not 1 <= options["k"] <= d_sae):
        raise ValueError(f"k must be an integer in [1, d_sae={d_sae}], got {options['k']!r}")

    p = {n: np.asarray(params[n], np.float64) for n in family.param_axes}
    for name, value in p.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or inf")
    folded = family.to_saelens(family.fold_input_scale(p, s))
    tensors = {n: np.ascontiguousarray(np.asarray(v).astype(DTYPES[dtype]))
               for n, v in folded.items()}
    cfg = build_cfg(d_in, d_sae, architecture=architecture, options=options, dtype=dtype,
                    metadata=metadata, input_scale=s)

    out_dir = check_destination(out_dir, overwrite)
    with atomic_dir(out_dir, last=CFG_FILENAME) as tmp:
        (tmp / WEIGHTS_FILENAME).write_bytes(safetensors.numpy.save(tensors))
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir


def _normalize_cfg(cfg: dict) -> dict:
    """Bring an old flat (SAELens < 6) cfg into the 6.x shape, like handle_pre_6_0_config."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if version and int(str(version).split(".")[0]) >= 6:
        return cfg
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    new = {renames.get(key, key): v for key, v in cfg.items()}
    new.setdefault("architecture", "standard")
    if new.get("activation_fn") == "topk":  # early 5.x topk: architecture "standard" + topk fn
        new["architecture"] = "topk"
    new.setdefault("apply_b_dec_to_input", True)
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = ("expected_average_only_in" if new["normalize_activations"]
                                        else "none")
    if new.get("normalize_activations") is None:
        new["normalize_activations"] = "none"
    if new["architecture"] == "topk" and "k" not in new:
        new["k"] = (new.get("activation_fn_kwargs") or {}).get("k")
    new["metadata"] = {key: v for key, v in new.items() if key in METADATA_KEYS}
    return new


def load_saelens(path) -> tuple[dict[str, np.ndarray], dict]:
    """(params as float32, cfg dict) of a SAELens SAE folder (a local one or a URL); old flat
    cfgs are normalized."""
    path = as_path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for f in (cfg_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"not a SAELens SAE folder: {f} is missing")
    try:
        cfg = _normalize_cfg(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    for key in ("d_in", "d_sae", "architecture"):
        if key not in cfg:
            raise KeyError(f"{cfg_path} has no {key!r}")
    family = family_for_saelens(cfg["architecture"])
    if family is None:
        raise ValueError(f"{cfg_path}: architecture {cfg['architecture']!r} is not one of "
                         f"{saelens_architectures()}")
    loaded = (safetensors.numpy.load(weights_path.read_bytes()) if is_url(path)
              else safetensors.numpy.load_file(str(weights_path)))
    tensors = {n: np.asarray(v, np.float32) for n, v in loaded.items()}
    params = family.from_saelens_tensors(tensors)
    missing = [n for n in family.param_axes if n not in params]
    if missing:
        raise KeyError(f"{weights_path} has no tensor(s) {missing} (has {sorted(tensors)})")
    d_in, d_sae = _sizes(params, family.param_axes)
    if (d_in, d_sae) != (cfg["d_in"], cfg["d_sae"]):
        raise ValueError(f"{weights_path}: W_enc shape {(d_in, d_sae)} does not match cfg "
                         f"d_in={cfg['d_in']}, d_sae={cfg['d_sae']}")
    return params, cfg


def _dataset_path(cfg) -> str | None:
    """Where a run's training activations came from, for cfg.json's metadata.dataset_path."""
    d = cfg.data
    path = {"store": d.store_path, "lm": d.tokens_path, "npy": ",".join(d.paths)}.get(d.source)
    return path or None


def _run_name(spec) -> str:
    """The run's absolute path (`RUN:member` for a sweep member)."""
    run_dir, member = split_member(spec)
    return (str(run_dir) if is_url(run_dir) else str(run_dir.resolve())) + (
        f":{member}" if member else "")


def export_run(run_dir, out_dir, *, overwrite: bool = False) -> AnyPath:
    """Export a training run's newest good checkpoint in SAELens's format. Only the parameters
    are read (onto all local devices, features sharded) and copied to the host shard by shard."""
    from saejax.runs import load_params, provenance  # noqa: PLC0415 (reads checkpoints)

    check_destination(out_dir, overwrite)  # before reading any checkpoint
    run = load_params(run_dir)
    sae_cfg, params = run.for_inference()
    family = get_family(sae_cfg.arch)
    if family.saelens_architecture is None:
        raise ValueError(f"sae.arch={family.name} has no SAELens architecture to export as")
    lm_path, site = provenance(run.cfg)
    return export_saelens(
        out_dir, jax.device_get(params), architecture=family.saelens_architecture,
        options=family.saelens_options(sae_cfg), input_scale=run.input_scale,
        overwrite=overwrite,
        metadata={"saejax_run": _run_name(run_dir), "saejax_step": run.step,
                  "dataset_path": _dataset_path(run.cfg), "model_name": lm_path or None,
                  "hook_name": site or None},
    )
