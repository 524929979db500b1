"""Tool calling in the Hermes / Qwen format: the model answers a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(one block per call). The chat template shows the tools (`tools` in the Jinja context, as Hugging Face
templates of Qwen, Hermes and Llama read them); `tool_choice: "required"` or a named function turns into
a grammar that only admits such blocks with arguments valid for the tool's `parameters` schema; the
generated text becomes OpenAI `tool_calls`, whole or streamed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .grammar import JSON_OPTIONS, MAX_GRAMMAR_CHARS, GrammarSpec, check_schema
from .errors import invalid_param

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128


@dataclass
class ParsedCall:
    """One call found in the output: the function name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"


def tool_parameters(tools: Sequence[Any]) -> list[str]:
    """Each tool's parameters schema as JSON text (size and depth checked; 400 naming the tool's field)."""
    if len(tools) > MAX_TOOLS:
        raise invalid_param("tools", f"{len(tools)} tools; at most {MAX_TOOLS} are allowed")
    names = set()
    out = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if fn.name in names:
            raise invalid_param(f"tools[{i}].function.name", f"the function name {fn.name!r} is used twice")
        names.add(fn.name)
        params = fn.parameters if fn.parameters is not None else {"type": "object"}
        out.append(check_schema(params, f"tools[{i}].function.parameters"))
    return out


def call_grammar(tools: Sequence[Any], parameters: Sequence[str], only: Optional[str], parallel: bool) -> GrammarSpec:
    """A Lark grammar admitting one tool-call block (or several, newline-separated, when `parallel`),
    restricted to the function `only` when given; each block's JSON matches its tool's schema."""
    options = []
    for tool, params in zip(tools, parameters):
        if only is not None and tool.function.name != only:
            continue
        options.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                        "properties": {"name": {"const": tool.function.name}, "arguments": json.loads(params)}})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema["x-guidance"] = dict(JSON_OPTIONS)
    body = json.dumps(schema)
    if len(body) > MAX_GRAMMAR_CHARS:
        raise invalid_param("tools", f"the tools' schemas come to {len(body):,} characters; at most "
                            f"{MAX_GRAMMAR_CHARS:,} can constrain a call")
    repeat = ' ("\\n" call)*' if parallel else ""
    lark = f'start: call{repeat}\ncall: "{TOOL_OPEN}\\n" %json {body} "\\n{TOOL_CLOSE}"\n'
    return GrammarSpec("lark", lark, "tools")


def _parse_call(block: str, names: set[str]) -> Optional[ParsedCall]:
    """A call from the text inside one block, or None when it is not `{"name": KNOWN, "arguments": {...}}`."""
    try:
        data = json.loads(block)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(data["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, names: set[str]) -> tuple[Optional[str], list[ParsedCall]]:
    """(content, calls) of a whole output: valid blocks become calls, the rest stays content (None when
    only whitespace is left). A last block left open by the end of generation counts if its JSON is whole."""
    stream = ToolCallStream(names)
    content, calls = stream.push(text)
    tail, more = stream.flush()
    content += tail
    calls += more
    if not calls:
        return text, []
    return (content.strip() or None), calls


class ToolCallStream:
    """Splits streamed text into content deltas and complete calls; text that may open a block is held back
    until it is known. Whitespace between calls is not content."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.buffer = ""
        self.inside = False
        self.pending_space = ""  # whitespace-only content, emitted with the next real content
        self.called = False

    def push(self, text: str) -> tuple[str, list[ParsedCall]]:
        """Content that can be shown now, and the calls completed by `text`."""
        self.buffer += text
        content: list[str] = []
        calls: list[ParsedCall] = []
        while True:
            if not self.inside:
                at = self.buffer.find(TOOL_OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buffer, TOOL_OPEN)
                    content.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                content.append(self.buffer[:at])
                self.buffer = self.buffer[at:]
                self.inside = True
            at = self.buffer.find(TOOL_CLOSE)
            if at < 0:
                break
            raw = self.buffer[:at + len(TOOL_CLOSE)]
            call = _parse_call(raw[len(TOOL_OPEN):at].strip(), self.names)
            if call is None:
                content.append(raw)  # not a valid call: the model's text, shown as it is
            else:
                calls.append(call)
            self.buffer = self.buffer[at + len(TOOL_CLOSE):]
            self.inside = False
        self.called = self.called or bool(calls)
        return self._shown("".join(content)), calls

    def flush(self) -> tuple[str, list[ParsedCall]]:
        """At the end of the output: an open block whose JSON is whole is a call; anything else is content."""
        rest, self.buffer = self.buffer, ""
        calls: list[ParsedCall] = []
        if self.inside:
            self.inside = False
            call = _parse_call(rest[len(TOOL_OPEN):].strip(), self.names)
            if call is not None:
                calls.append(call)
                rest = ""
        self.called = self.called or bool(calls)
        shown = self._shown(rest)
        if not self.called:
            shown += self.pending_space  # plain text keeps its trailing whitespace
        self.pending_space = ""
        return shown, calls

    def _shown(self, text: str) -> str:
        if not text:
            return ""
        if not text.strip():
            self.pending_space += text
            return ""
        text, self.pending_space = self.pending_space + text, ""
        return text


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (it may be completed by later text)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


__all__ = ["ParsedCall", "ToolCallStream", "parse_tool_calls", "call_grammar", "tool_parameters", "TOOL_OPEN",
           "TOOL_CLOSE", "MAX_TOOLS"]
