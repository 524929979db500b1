"""Tokenizers: a thin wrapper over Hugging Face `tokenizers` (byte-level BPE or characters) + chat templates."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .atomic import atomic_write_text
from .errors import GptforgeError

# ChatML, the default when a tokenizer brings no template of its own. With `tools`, a system turn lists them
# as JSON schemas and asks for calls in <tool_call> blocks (the Hermes / Qwen protocol, which
# gptforge.serve.tools parses); assistant calls render as those blocks and tool results as <tool_response>
# blocks in a user turn, consecutive results sharing one turn.
CHATML_TEMPLATE = (
    "{% set tool_list = tools if tools is defined else none %}"  # lm-eval renders with StrictUndefined, no tools
    "{% if tool_list %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou can call these functions, given as JSON schemas:\n<tools>\n' }}"
    "{% for tool in tool_list %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools>\n\nTo call functions, answer with one block per call, each a JSON object with the function '"
    "'name and its arguments:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <arguments-object>}\n'"
    "'</tool_call><|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tool_list and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
    "{% for call in (message['tool_calls'] if message['tool_calls'] is defined else none) or [] %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + fn.name + '\", \"arguments\": ' }}"
    "{{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """JSON as chat templates expect it (Jinja's own `tojson` escapes HTML characters)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _template_environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja environment chat templates run in (built once)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class TokenizerError(GptforgeError, ValueError):
    """Raised for unreadable tokenizer files or invalid tokenizer arguments."""


class Tokenizer:
    """Encode/decode text, render chat templates, save/load `tokenizer.json` + `tokenizer_config.json`."""

    def __init__(self, backend: HFTokenizer, *, eos_token: Optional[str] = None, bos_token: Optional[str] = None,
                 pad_token: Optional[str] = None, chat_template: Optional[str] = None,
                 add_bos: bool = False, kind: str = "bpe") -> None:
        self.backend = backend
        self.kind = kind
        self.eos_token = eos_token if eos_token is not None else self._first_present(["<|endoftext|>", "</s>", "<|im_end|>"])
        self.bos_token = bos_token
        self.pad_token = pad_token if pad_token is not None else self._first_present(["<|pad|>", "<pad>"])
        self.chat_template = chat_template
        self.add_bos = add_bos

    def _first_present(self, candidates: Sequence[str]) -> Optional[str]:
        for token in candidates:
            if self.backend.token_to_id(token) is not None:
                return token
        return None

    # ---- ids of special tokens --------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> Optional[int]:
        pad = self.token_to_id(self.pad_token)
        return pad if pad is not None else self.eos_token_id

    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generation: EOS and, for chat models, the end-of-turn marker."""
        # End-of-turn markers: ChatML (Qwen), Llama 3, Gemma, Phi-3/4.
        markers = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
        ids = {self.eos_token_id, *(self.token_to_id(m) for m in markers)}
        return sorted(i for i in ids if i is not None)

    # ---- encode / decode --------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: Optional[bool] = None) -> list[int]:
        """Token ids of `text`; a BOS is prepended when the tokenizer asks for one."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_special_tokens is None else add_special_tokens) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: Optional[bool] = None) -> list[list[int]]:
        """Encode many texts in parallel (the Rust backend uses all cores)."""
        batch = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if (self.add_bos if add_special_tokens is None else add_special_tokens) and self.bos_token_id is not None:
            batch = [[self.bos_token_id] + ids for ids in batch]
        return batch

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self.backend.id_to_token(token_id)

    # ---- bytes of tokens --------------------------------------------------------------------
    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added special tokens (EOS, chat markers, ...), which `skip_special_tokens` drops."""
        if not hasattr(self, "_special_ids"):
            self._special_ids = frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)
        return self._special_ids

    @property
    def byte_level(self) -> bool:
        """True when decoding maps each token to fixed bytes (byte-level BPE: GPT-2, Llama 3, Qwen, ours)."""
        return isinstance(self.backend.decoder, decoders.ByteLevel)

    def token_bytes(self) -> Optional[list[Optional[bytes]]]:
        """The UTF-8 bytes each id decodes to (added tokens: their content), or None unless `byte_level`.

        Decoding a byte-level sequence is concatenating these bytes and reading them as UTF-8, which lets
        streaming decode token by token in O(1) instead of re-decoding a window through the backend.
        """
        if not self.byte_level:
            return None
        if not hasattr(self, "_token_bytes"):
            to_byte = {c: b for b, c in bytes_to_unicode().items()}
            added = self.backend.get_added_tokens_decoder()
            table: list[Optional[bytes]] = []
            for i in range(self.vocab_size):
                piece = self.backend.id_to_token(i)
                if piece is None:
                    table.append(None)
                elif i in added or not all(c in to_byte for c in piece):
                    table.append(piece.encode("utf-8"))
                else:
                    table.append(bytes(to_byte[c] for c in piece))
            self._token_bytes = table
        return self._token_bytes

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat templates ---------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, tools: Optional[Sequence[dict[str, Any]]] = None,
                            **variables: Any) -> str | list[int]:
        """Render `messages` with the tokenizer's Jinja template (ChatML when it has none).

        The environment is the one `transformers` gives templates (sandboxed, `{% break %}`/`{% continue %}`,
        a `tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`), so the templates that Qwen3,
        Gemma, Phi, Llama or Hermes tokenizers carry render as they do there. Messages and `tools` follow
        Hugging Face's conventions (assistant `tool_calls` with dict arguments, `tool` results); `variables`
        reach the template as globals, e.g. `enable_thinking=False` for Qwen3.
        """
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or \
                    ("content" not in message and not message.get("tool_calls")):
                raise TokenizerError(f"messages[{i}] must be a mapping with 'role' and 'content' (or 'tool_calls')")
        try:
            template = _template_environment().from_string(self.chat_template or CHATML_TEMPLATE)
            text = template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   tools=list(tools) if tools else None,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "", **variables)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed to render: {exc}") from exc
        except TypeError as exc:  # e.g. a template adding None to a string
            raise TokenizerError(f"chat template failed to render: {exc}") from exc
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- training ---------------------------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int,
                  special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, min_frequency: int = 2,
                  show_progress: bool = False) -> "Tokenizer":
        """Train a byte-level BPE tokenizer (GPT-2 style: any Unicode string round-trips exactly)."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(special_tokens):
            raise TokenizerError(f"vocab_size must be at least {len(alphabet) + len(special_tokens)} "
                                 f"for byte-level BPE (256 bytes + special tokens), got {vocab_size}")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(special_tokens), initial_alphabet=alphabet,
                                      show_progress=show_progress)
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, kind="bpe")

    @classmethod
    def train_char(cls, texts: Iterable[str], special_tokens: Sequence[str] = ()) -> "Tokenizer":
        """A character-level tokenizer over the characters seen in `texts` (sorted, nanoGPT-style ids)."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise TokenizerError("cannot build a character tokenizer from empty text")
        vocab = {tok: i for i, tok in enumerate(list(special_tokens) + sorted(chars - set(special_tokens)))}
        # BPE with no merges is a character model; the Split pre-tokenizer keeps every char separate.
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
        backend.decoder = decoders.Fuse()
        if special_tokens:
            backend.add_special_tokens(list(special_tokens))
        return cls(backend, kind="char")

    def with_special_tokens(self, tokens: Sequence[str]) -> "Tokenizer":
        """This tokenizer, or a copy with those of `tokens` it lacks added as special tokens (new ids at the end)."""
        missing = [t for t in tokens if self.backend.token_to_id(t) is None]
        if not missing:
            return self
        backend = HFTokenizer.from_str(self.backend.to_str())
        backend.add_special_tokens(missing)
        return Tokenizer(backend, eos_token=self.eos_token, bos_token=self.bos_token, pad_token=self.pad_token,
                         chat_template=self.chat_template, add_bos=self.add_bos, kind=self.kind)

    # ---- files ------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (a file, or a directory holding it and maybe `tokenizer_config.json`)."""
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"tokenizer file not found: {file}")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as exc:  # the Rust error type is not exported
            raise TokenizerError(f"{file}: not a valid tokenizer.json: {exc}") from exc
        settings: dict[str, Any] = {}
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            try:
                settings = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise TokenizerError(f"{config_file}: invalid JSON: {exc}") from exc
        template = settings.get("chat_template")
        if isinstance(template, list):  # HF allows named templates; take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        kind = settings.get("gptforge_kind") or ("char" if isinstance(backend.decoder, decoders.Fuse) else "bpe")
        return cls(backend, eos_token=_token_str(settings.get("eos_token")), bos_token=_token_str(settings.get("bos_token")),
                   pad_token=_token_str(settings.get("pad_token")), chat_template=template,
                   add_bos=bool(settings.get("add_bos_token", False)), kind=kind)

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "tokenizer.json", self.backend.to_str(pretty=False))
        settings = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.pad_token,
            "add_bos_token": self.add_bos, "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False, "gptforge_kind": self.kind,
        }
        if self.chat_template:
            settings["chat_template"] = self.chat_template
        # Special tokens beyond eos/bos/pad (e.g. the FIM tokens), as Hugging Face lists them (StarCoder does).
        named = {self.eos_token, self.bos_token, self.pad_token}
        extra = [t.content for _, t in sorted(self.backend.get_added_tokens_decoder().items())
                 if t.special and t.content not in named]
        if extra:
            settings["additional_special_tokens"] = extra
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(settings, indent=2))
        return directory


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _token_str(value: Any) -> Optional[str]:
    """HF stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value




__all__ = ["Tokenizer", "TokenizerError", "CHATML_TEMPLATE", "DEFAULT_SPECIAL_TOKENS", "atomic_write_text"]
