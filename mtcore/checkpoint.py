"""Hugging Face checkpoints in and out: config.json <-> ModelArgs, safetensors <-> Llama.

Loading builds the model on the meta device and fills it tensor by tensor from the safetensors
files, cast on the way, so an 8B model never sits in memory twice. Saving writes what
transformers' AutoModelForCausalLM / AutoModelForSequenceClassification and vLLM read:
config.json, generation_config.json, model.safetensors or model-0000k-of-0000n.safetensors with
model.safetensors.index.json, and the tokenizer files. A save is atomic: it is written to a
sibling temp directory and renamed into place, so an interrupted save never leaves a half model.
"""

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mtcore.errors import MtcoreError
from mtcore.model import Llama, ModelArgs
from mtcore.outputs import check_out_dir, commit_dir, open_partial, partial_dir
from mtcore import parallel
from mtcore.device import default_dtype
from mtcore.files import check_free_space, default_file_mode, read_json, replace_dir, write_json


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# config.json keys that ModelArgs reads; everything else is carried through `extra` on save.
_READ_KEYS = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
              "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
              "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "architectures",
              "model_type", "torch_dtype", "dtype", "id2label", "label2id", "num_labels",
              "transformers_version", "_name_or_path", "hidden_act"}


def resolve(src: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id found in (or, online, fetched into) the HF cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MtcoreError(f"{path}: is a file; give the checkpoint's directory (with config.json)")
    name = str(src)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise MtcoreError(f"{name}: no such checkpoint directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise MtcoreError(f"{name}: not a local directory and not in the Hugging Face cache (HF_HUB_OFFLINE is set); "
                          f"run `hf download {name}` where the hub is reachable, or pass a local directory")
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MtcoreError(f"{name}: not a local directory, not in the Hugging Face cache, and the hub gave: {reason}; "
                          f"run `hf download {name}` (after `hf auth login` for gated models) "
                          f"where the hub is reachable, or pass a local directory") from None


def _field(cfg: dict, key: str, where: str, kind=int, default=None, positive=True):
    """cfg[key] checked to be a `kind` (positive, for ints); `default` when absent (None: required)."""
    if key not in cfg or cfg[key] is None:
        if default is None:
            raise MtcoreError(f"{where}: missing key {key!r}")
        return default
    value = cfg[key]
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
        isinstance(value, int) and not isinstance(value, bool))
    if not ok or (positive and kind is not bool and value <= 0):
        raise MtcoreError(f"{where}: {key} must be a {'positive ' if positive and kind is not bool else ''}"
                          f"{kind.__name__}, got {value!r}")
    return value


def config_to_args(cfg: dict, where: str = "config.json") -> ModelArgs:
    """A Hugging Face Llama config (transformers 4.x or 5.x layout) -> ModelArgs."""
    if not isinstance(cfg, dict):
        raise MtcoreError(f"{where}: must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("model_type") != "llama":
        raise MtcoreError(f"{where}: model_type is {cfg.get('model_type')!r}; mtcore runs Llama checkpoints only")
    if cfg.get("hidden_act", "silu") != "silu":
        raise MtcoreError(f"{where}: hidden_act {cfg['hidden_act']!r} is not Llama's silu")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise MtcoreError(f"{where}: rope_parameters / rope_scaling must be an object, got {rope!r}")
    rope = dict(rope)
    rope_theta = _field({"rope_theta": rope.pop("rope_theta", cfg.get("rope_theta"))}, "rope_theta", where,
                        float, 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise MtcoreError(f"{where}: rope_type {rope_type!r} is not supported (only default and llama3)")
    rope_scaling = None
    if rope_type == "llama3":
        need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        rope_scaling = {"rope_type": "llama3", **{k: _field(rope, k, f"{where}: llama3 rope scaling", float)
                                                  for k in need}}
        if rope_scaling["high_freq_factor"] <= rope_scaling["low_freq_factor"]:
            raise MtcoreError(f"{where}: llama3 rope scaling needs high_freq_factor > low_freq_factor")
    n_heads = _field(cfg, "num_attention_heads", where)
    try:
        return ModelArgs(
            vocab_size=_field(cfg, "vocab_size", where), dim=_field(cfg, "hidden_size", where),
            n_layers=_field(cfg, "num_hidden_layers", where), n_heads=n_heads,
            n_kv_heads=_field(cfg, "num_key_value_heads", where, default=n_heads),
            head_dim=_field(cfg, "head_dim", where, default=0) or 0,
            intermediate_size=_field(cfg, "intermediate_size", where),
            norm_eps=_field(cfg, "rms_norm_eps", where, float, 1e-6), rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=_field(cfg, "max_position_embeddings", where, default=2048),
            tie_word_embeddings=_field(cfg, "tie_word_embeddings", where, bool, False),
            attention_bias=_field(cfg, "attention_bias", where, bool, False),
            mlp_bias=_field(cfg, "mlp_bias", where, bool, False),
            initializer_range=_field(cfg, "initializer_range", where, float, 0.02),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            extra={k: v for k, v in cfg.items() if k not in _READ_KEYS},
        )
    except ValueError as e:
        raise MtcoreError(f"{where}: {e}") from None


def args_to_config(args: ModelArgs, kind: str, dtype: torch.dtype) -> dict:
    """ModelArgs -> config.json, in the layout vLLM and transformers 4.x/5.x all read."""
    cfg = dict(args.extra)
    cfg.update(
        model_type="llama", architectures=["LlamaForCausalLM" if kind == "policy" else "LlamaForSequenceClassification"],
        vocab_size=args.vocab_size, hidden_size=args.dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
        intermediate_size=args.intermediate_size, hidden_act="silu", rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, rope_scaling=args.rope_scaling,
        max_position_embeddings=args.max_position_embeddings, tie_word_embeddings=args.tie_word_embeddings,
        attention_bias=args.attention_bias, attention_dropout=0.0, mlp_bias=args.mlp_bias,
        initializer_range=args.initializer_range, bos_token_id=args.bos_token_id,
        eos_token_id=args.eos_token_id, pad_token_id=args.pad_token_id,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if kind == "reward":
        cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return cfg


def meta_model(args: ModelArgs, kind: str) -> Llama:
    """A Llama on the meta device (shapes, no storage), built without the random fills of the
    layers' default init: a meta tensor holds no values, and torch runs those fills through Python
    references whose first use imports torch._dynamo (1.5 s of every `mtcore info`)."""
    fills = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {name: getattr(torch.nn.init, name) for name in fills}
    try:
        for name in fills:
            setattr(torch.nn.init, name, lambda tensor, *_, **__: tensor)
        with torch.device("meta"):
            return Llama(args, kind)
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def kind_of(cfg: dict) -> str:
    """'reward' for a LlamaForSequenceClassification config, else 'policy'."""
    return "reward" if "LlamaForSequenceClassification" in (cfg.get("architectures") or []) else "policy"


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    if (path / INDEX_NAME).exists():
        index = read_json(path / INDEX_NAME)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise MtcoreError(f"{path / INDEX_NAME}: no weight_map object")
        files = {name: path / fname for name, fname in index["weight_map"].items()}
        for f in set(files.values()):
            if not f.exists():
                raise MtcoreError(f"{path / INDEX_NAME}: names {f.name}, which is missing from {path}")
        return files
    singles = [path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).exists() else sorted(path.glob("*.safetensors"))
    if not singles:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise MtcoreError(f"{path}: only pickle weights (*.bin/*.pt) found; mtcore reads safetensors only — "
                              f"convert them once with transformers' save_pretrained(safe_serialization=True)")
        raise MtcoreError(f"{path}: no *.safetensors weights")
    files = {}
    for f in singles:
        with _open_safetensors(f) as st:
            files.update({name: f for name in st.keys()})
    return files


def inspect_checkpoint(src) -> tuple[Path, ModelArgs, str, int, set[str]]:
    """(path, args, kind, parameter count, stored dtypes) from config.json and the safetensors
    headers alone (no tensor is read), after check_checkpoint's checks."""
    path = resolve(src)
    kind = kind_of(read_json(path / "config.json"))
    args, headers = check_checkpoint(path, kind)
    return path, args, kind, sum(math.prod(shape) for _, shape, _ in headers.values()), {
        d for _, _, d in headers.values()}


def _by_file(files: dict[str, Path], names) -> dict[Path, list[str]]:
    """Group tensor names by the safetensors file that holds them, so each file is opened once."""
    grouped: dict[Path, list[str]] = {}
    for name in names:
        grouped.setdefault(files[name], []).append(name)
    return grouped


HEADER_LIMIT = 100_000_000  # safetensors refuses a longer header


def check_weights_size(f: Path) -> None:
    """A safetensors file is 8 bytes (n, the header's length, little-endian), n bytes of JSON header,
    then the tensors, which the header's data_offsets place: their end is the file's end. A file cut
    short (a copy or a save that stopped, a full disk) is found from the header alone, before any
    tensor is read. A header that cannot be read is left to safetensors to report."""
    try:
        with open(f, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = int.from_bytes(fh.read(8), "little")
            if n > HEADER_LIMIT:  # not a header's length: not a safetensors file at all
                return
            if 8 + n > size:
                raise MtcoreError(f"{f}: truncated or damaged ({size} bytes, less than its header's length)")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
        return
    if 8 + n + end != size:
        raise MtcoreError(f"{f}: truncated or damaged ({size} bytes; its header describes {8 + n + end})")


def _open_safetensors(f: Path):
    check_weights_size(f)
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except Exception as e:
        raise MtcoreError(f"{f}: not a readable safetensors file ({e})") from None


FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


def check_checkpoint(path: Path, kind: str) -> tuple[ModelArgs, dict[str, tuple[Path, list[int], str]]]:
    """Everything about a checkpoint that can be known without reading a tensor: config.json makes a
    Llama of `kind`, and the safetensors headers hold exactly its tensors (a stored tied head and old
    rotary buffers aside), each of the shape config.json implies and of a floating dtype.
    Returns (args, {tensor name: (its file, shape, stored dtype)}) of the tensors load_model reads."""
    if kind not in ("policy", "reward"):
        raise ValueError(f"kind must be 'policy' or 'reward', got {kind!r}")
    args = config_to_args(read_json(path / "config.json"), str(path / "config.json"))
    model = meta_model(args, kind)
    wanted = {name for name in model.state_dict() if not (name == "lm_head.weight" and args.tie_word_embeddings)}
    files = _weight_files(path)
    hint = {"lm_head.weight": "it looks like a reward model; load it with kind='reward'",
            "score.weight": "it looks like a policy, not a reward model (LlamaForSequenceClassification)"}
    missing = sorted(wanted - files.keys())
    if missing:
        raise MtcoreError(f"{path}: checkpoint lacks {missing[0]}"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                          + (f"; {hint[missing[0]]}" if missing[0] in hint else ""))
    # A tied head may still be stored; old checkpoints carry rotary buffers. Anything else is a
    # sign that config.json and the weights disagree (more layers, the other head).
    unexpected = sorted(n for n in files.keys() - wanted
                        if n != "lm_head.weight" and not n.endswith("rotary_emb.inv_freq"))
    if "lm_head.weight" in files and kind == "reward":
        unexpected.insert(0, "lm_head.weight")
    if unexpected:
        other = {"lm_head.weight": "score.weight", "score.weight": "lm_head.weight"}.get(unexpected[0])
        raise MtcoreError(f"{path}: checkpoint has {unexpected[0]}"
                          + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
                          + f", which config.json's {kind} model does not use"
                          + (f"; {hint[other]}" if other in hint else ""))
    headers = {}
    for f, names in _by_file(files, sorted(wanted)).items():
        with _open_safetensors(f) as st:
            stored = set(st.keys())
            for name in names:
                if name not in stored:
                    raise MtcoreError(f"{f}: lacks {name}, which {INDEX_NAME} places there")
                tensor_slice = st.get_slice(name)
                shape, dtype = list(tensor_slice.get_shape()), tensor_slice.get_dtype()
                if tuple(shape) != tuple(model.get_parameter(name).shape):
                    raise MtcoreError(f"{f}: {name} has shape {tuple(shape)}, config.json implies "
                                      f"{tuple(model.get_parameter(name).shape)}")
                if dtype not in FLOAT_DTYPES:
                    raise MtcoreError(f"{f}: {name} is stored as {dtype}; weights must be floating point "
                                      f"({', '.join(FLOAT_DTYPES)})")
                headers[name] = (f, shape, dtype)
    return args, headers


def load_model(src, kind: str = "policy", dtype=None, device=None) -> Llama:
    """A Llama policy or reward model from a Hugging Face checkpoint directory or hub id.

    dtype: torch dtype or name ("bf16", "fp32", ...); default bf16 on CUDA, fp32 on CPU.
    device: default CPU. Parameters are created straight in (dtype, device).
    """
    path = resolve(src)
    device = torch.device(device or "cpu")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MtcoreError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or default_dtype(device)
    args, headers = check_checkpoint(path, kind)
    model = meta_model(args, kind)
    state = {}
    for f, names in _by_file({name: f for name, (f, _, _) in headers.items()}, sorted(headers)).items():
        with _open_safetensors(f) as st:
            for name in names:
                state[name] = st.get_tensor(name).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.source = path
    return model


def save_tokenizer(tokenizer, out) -> None:
    """tokenizer.save_pretrained into `out`, its config made loadable by transformers 4.x too."""
    tokenizer.save_pretrained(str(out))
    _portable_tokenizer_config(Path(out))


def _portable_tokenizer_config(out: Path) -> None:
    """Name the tokenizer class PreTrainedTokenizerFast, which transformers 4.x and 5.x both load:
    5.x writes "TokenizersBackend", a name 4.x does not know."""
    config_path = out / "tokenizer_config.json"
    if not config_path.exists():
        return
    config = read_json(config_path)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json(config_path, config)


def convert(src, dst, kind=None, dtype="bf16", max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """`mtcore convert`: re-save the checkpoint src into the directory dst (outputs.check_out_dir's
    rules: dst never holds src, and is replaced only when it is convert's own earlier output)."""
    path = resolve(src)
    dst = check_out_dir(dst, "convert", (path,), overwrite)
    kind = kind or kind_of(read_json(path / "config.json"))
    n_params = inspect_checkpoint(path)[3]
    nbytes = (DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype or torch.float32).itemsize
    check_free_space(partial_dir(dst), n_params * nbytes, "the converted checkpoint")
    model = load_model(path, kind=kind, dtype=dtype)
    work = open_partial(dst, "convert", keep=())
    commit_dir(save_model(model, work / "model", max_shard_bytes=max_shard_bytes), dst, "convert")
    return dst


def _dtype_of(model: Llama) -> torch.dtype:
    return next(model.parameters()).dtype


def stored_dtype(src) -> torch.dtype:
    """The dtype a checkpoint is kept in, for saving what is trained from it alike (bf16 for
    Llama-3-8B, fp32 for the toy world): config.json's torch_dtype (dtype in transformers 5), else
    its stored tensors' floating dtype when they share one, else fp32."""
    path = resolve(src)
    cfg = read_json(path / "config.json")
    named = cfg.get("torch_dtype") or cfg.get("dtype")
    if isinstance(named, str) and named in DTYPES:
        return DTYPES[named]
    stored = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    floats = {d for d in inspect_checkpoint(path)[4] if d in stored}
    return stored[floats.pop()] if len(floats) == 1 else torch.float32


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy where it views part of a larger storage (the parameters merge_projections left as
    views of one merged weight): safetensors refuses tensors that share memory."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_model(model: Llama, dst, tokenizer=None, max_shard_bytes: int = 5 * 2**30, dtype=None) -> Path:
    """Write `model` as a Hugging Face checkpoint in `dst` (replacing what is there, atomically), its
    weights cast to `dtype` (default: the model's own; see stored_dtype for a source checkpoint's).

    The tokenizer is `tokenizer.save_pretrained`'s output when given, else the tokenizer files of the
    checkpoint the model was loaded from. generation_config.json is copied from there too, or built
    from the config's bos/eos ids.

    Under torchrun every rank calls it: a sharded model is gathered to rank 0's CPU first
    (parallel.full_model), rank 0 alone writes, and every rank returns once it is written.
    """
    if parallel.is_sharded(model):
        model = parallel.full_model(model)
    if parallel.is_main():
        _save_atomic(model, Path(dst), tokenizer, max_shard_bytes, dtype)
    parallel.barrier()
    return Path(dst)


def _save_atomic(model: Llama, dst: Path, tokenizer, max_shard_bytes: int, dtype) -> None:
    if dst.exists() and not dst.is_dir():
        raise MtcoreError(f"{dst}: exists and is not a directory; choose another output path")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise MtcoreError(f"{dst}: cannot write there ({e.strerror or e})") from None
    try:
        _write_checkpoint(model, tmp, tokenizer, max_shard_bytes, dtype)
        replace_dir(tmp, dst)
    except (OSError, SafetensorError) as e:  # disk full, permissions: dst keeps what it had
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise MtcoreError(f"{dst}: cannot write the checkpoint ({reason})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_checkpoint(model: Llama, out: Path, tokenizer, max_shard_bytes: int, dtype=None) -> None:
    dtype = dtype or _dtype_of(model)
    state = model.state_dict()
    if model.kind == "policy" and model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file({k: _own_storage(v.detach().to(dtype).contiguous().cpu()) for k, v in shard.items()},
                  str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, default_file_mode())  # safetensors writes 0600 whatever the umask
        weight_map.update({k: fname for k in shard})
    if n > 1:
        total = sum(t.numel() * dtype.itemsize for t in state.values())
        write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(out / "config.json", args_to_config(model.args, model.kind, dtype))
    source = getattr(model, "source", None)
    if source is not None and (source / "generation_config.json").exists():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
    else:
        gen = {"bos_token_id": model.args.bos_token_id, "eos_token_id": model.args.eos_token_id}
        if model.args.pad_token_id is not None:
            gen["pad_token_id"] = model.args.pad_token_id
        write_json(out / "generation_config.json", gen)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif source is not None:
        for fname in TOKENIZER_FILES:
            if (source / fname).exists():
                shutil.copyfile(source / fname, out / fname)
    _portable_tokenizer_config(out)
