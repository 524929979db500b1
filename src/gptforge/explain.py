"""Explain a model's reading of a text: per-token log-probabilities, surprisal, alternatives, attention maps.

The model attends with `scaled_dot_product_attention`, which never materialises the attention weights.
`attention_maps` switches on each layer's opt-in recording (`Attention.record_weights`): for that one
forward the model's own attention runs its eager path, the same code that soft-capped models always use,
with the same masks, scaling, soft-cap, QK-norm and RoPE, and keeps the probabilities. Nothing here
re-implements attention. The weights are checked against `transformers` eager attention with
`output_attentions=True`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_write_bytes, atomic_write_text
from .model import GPT

if TYPE_CHECKING:  # pragma: no cover
    from .tokenizer import Tokenizer

LN2 = math.log(2.0)
# Attention values embedded in explanation.json and the HTML page at most; beyond this (e.g. GPT-2's
# 144 heads over 256 tokens = 9.4M values) they go to attention.npy and the page shows the PNGs only.
MAX_EMBEDDED_ATTENTION = 2_000_000


@dataclass
class Alternative:
    """A token the model considered at a position, with its log-probability (nats)."""

    token_id: int
    token: str
    logprob: float


@dataclass
class TokenExplanation:
    """One input token: how likely the model found it given the tokens before it."""

    position: int
    token_id: int
    token: str
    logprob: Optional[float]  # natural log; None for the first token (nothing predicts it)
    surprisal_bits: Optional[float]  # -log2 p
    rank: Optional[int]  # 1 = the model's top choice
    top_alternatives: list[Alternative] = field(default_factory=list)  # what the model expected here


@dataclass
class Explanation:
    """Everything `explain` computes for one text; attention is (n_layer, n_head, T, T), rows = queries."""

    text: str
    tokens: list[TokenExplanation]
    attentions: Optional[torch.Tensor]

    @property
    def token_strings(self) -> list[str]:
        return [t.token for t in self.tokens]

    @property
    def mean_surprisal_bits(self) -> float:
        """Mean surprisal over the predicted tokens (all but the first)."""
        values = [t.surprisal_bits for t in self.tokens if t.surprisal_bits is not None]
        return sum(values) / len(values) if values else float("nan")

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-likelihood of the predicted tokens."""
        values = [-t.logprob for t in self.tokens if t.logprob is not None]
        return math.exp(sum(values) / len(values)) if values else float("nan")

    def to_dict(self, include_attention: bool = True) -> dict[str, Any]:
        """JSON-ready dict; attention as nested lists (n_layer, n_head, T, T) rounded to 5 digits."""
        data: dict[str, Any] = {
            "text": self.text,
            "num_tokens": len(self.tokens),
            "mean_surprisal_bits": _finite(self.mean_surprisal_bits),
            "perplexity": _finite(self.perplexity),
            "tokens": [asdict(t) for t in self.tokens],
        }
        if include_attention and self.attentions is not None:
            data["attention_shape"] = list(self.attentions.shape)
            data["attentions"] = torch.round(self.attentions.float() * 1e5).div(1e5).tolist()
        return data


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


# ---- attention weights ----------------------------------------------------------------------------

@torch.no_grad()
def attention_maps(model: GPT, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model once; return (logits (B, T, V), attention weights (n_layer, B, n_head, T, T))."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if model.has_cache:
        raise ValueError("attention_maps needs a model without a KV cache; call model.clear_cache() first")
    layers = [block.attn for block in model.blocks]
    for attn in layers:
        attn.record_weights = True
    try:
        logits = model(input_ids)
        maps = [attn.weights for attn in layers]  # each (B, H, T, T)
    finally:
        for attn in layers:
            attn.record_weights, attn.weights = False, None
    return logits, torch.stack(maps)  # (L, B, H, T, T)


# ---- the explanation --------------------------------------------------------------------------------

@torch.no_grad()
def explain(model: GPT, text: str | Sequence[int], tokenizer: Optional["Tokenizer"] = None, *,
            top_k: int = 5, attention: bool = True, max_tokens: Optional[int] = None) -> Explanation:
    """Per-token log-probabilities, surprisal, top-k alternatives and attention maps for one text."""
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("explain: a tokenizer is needed to encode text (the model directory has no "
                             "tokenizer.json); pass tokenizer= or token ids")
        ids = tokenizer.encode(text)
    else:
        ids = [int(i) for i in text]
    if top_k < 0:
        raise ValueError(f"explain: top_k must be >= 0, got {top_k}")
    if not ids:
        raise ValueError("explain: the text encodes to zero tokens; give a non-empty text")
    limit = min(max_tokens or model.config.block_size, model.config.block_size)
    if len(ids) > limit:
        raise ValueError(f"explain: the text is {len(ids)} tokens, more than the limit of {limit} "
                         f"(model context {model.config.block_size}); shorten it or raise max_tokens")
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"explain: token ids {bad[:5]} are outside the model vocabulary [0, {vocab})")

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        if attention:
            logits, maps = attention_maps(model, input_ids)
            attentions = maps[:, 0].cpu()  # (L, H, T, T)
        else:
            logits, attentions = model(input_ids), None
    finally:
        model.train(was_training)

    logprobs = F.log_softmax(logits[0].float(), dim=-1).cpu()  # (T, V): row t predicts token t+1
    names = [_token_text(tokenizer, i) for i in ids]
    tokens = [TokenExplanation(0, ids[0], names[0], None, None, None, [])]
    for pos in range(1, len(ids)):
        row = logprobs[pos - 1]
        lp = float(row[ids[pos]])
        rank = int((row > row[ids[pos]]).sum()) + 1
        alternatives = []
        if top_k:
            values, indices = row.topk(min(top_k, row.numel()))
            alternatives = [Alternative(int(i), _token_text(tokenizer, int(i)), float(v))
                            for v, i in zip(values, indices)]
        tokens.append(TokenExplanation(pos, ids[pos], names[pos], lp, -lp / LN2, rank, alternatives))
    shown = text if isinstance(text, str) else "".join(names)
    return Explanation(shown, tokens, attentions)


def _token_text(tokenizer: Optional["Tokenizer"], token_id: int) -> str:
    """The text a single token stands for (byte-level pieces decoded; partial UTF-8 shown as U+FFFD)."""
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id])


# ---- pictures and the HTML page ---------------------------------------------------------------------

# Whitespace made visible in labels: a token is often just "\n" or "    ", which would print as nothing.
_VISIBLE = {"\n": "↵", "\t": "⇥", " ": "·"}


def _label(token: str, limit: int = 12) -> str:
    """A short, visible label: space '·', newline '↵', tab '⇥', other control characters as \\xNN."""
    shown = "".join(_VISIBLE.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch)
                    for ch in token) or "∅"
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _percent(probability: float) -> str:
    """A probability as a percentage with the digits that matter: 0.4321 -> '43%', 0.0213 -> '2.1%'."""
    pct = 100.0 * probability
    if pct >= 99.95:
        return "100%"
    if pct >= 10:
        return f"{pct:.0f}%" if pct < 99 else f"{pct:.1f}%"
    if pct >= 1:
        return f"{pct:.1f}%"
    if pct >= 0.01:
        return f"{pct:.2f}%"
    return "<0.01%"


def attention_figure_png(weights: torch.Tensor, labels: Sequence[str], title: str) -> bytes:
    """One PNG with a heatmap per head: weights (H, T, T), rows are queries, columns keys."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_head, t = weights.shape[0], weights.shape[-1]
    cols = min(n_head, 4 if t <= 10 else 2)
    rows = math.ceil(n_head / cols)
    # The PNG is ~10 inches at 100 dpi (the width of the HTML page), so the page shows it 1:1, not shrunk;
    # the tick font is the largest that fits a token's row (0.8 of the cell is the heatmap), 7 to 11 points.
    cell = (9.6 - 1.2) / cols
    font = max(7, min(11, int(0.8 * 72 * cell * 0.8 / t)))
    fig = Figure(figsize=(cols * cell + 1.2, rows * cell + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    shown = [_label(s) for s in labels]
    ticks = t <= 40
    for head in range(n_head):
        ax = fig.add_subplot(rows, cols, head + 1)
        image = ax.imshow(weights[head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=font + 1)
        if ticks:
            ax.set_xticks(range(t), shown, rotation=90, fontsize=font)
            ax.set_yticks(range(t), shown, fontsize=font)
        else:
            ax.set_xlabel("key position", fontsize=font)
            ax.set_ylabel("query position", fontsize=font)
    colorbar = fig.colorbar(image, ax=fig.axes, shrink=0.8)
    colorbar.set_label("attention weight", fontsize=font)
    colorbar.ax.tick_params(labelsize=font)
    fig.suptitle(title, fontsize=font + 3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def surprisal_figure_png(explanation: Explanation) -> bytes:
    """A bar chart of per-token surprisal in bits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .formatting import round_figure

    tokens = explanation.tokens[1:]
    fig = Figure(figsize=(max(5.0, 0.38 * len(tokens) + 1.8), 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(tokens)), [t.surprisal_bits for t in tokens], color="#d0563b")
    if len(tokens) <= 60:
        ax.set_xticks(range(len(tokens)), [_label(t.token) for t in tokens], rotation=90,
                      fontsize=11 if len(tokens) <= 30 else 9)
    ax.set_ylabel("surprisal (bits)", fontsize=11)
    ax.set_title(f"mean {explanation.mean_surprisal_bits:.2f} bits/token, "
                 f"perplexity {round_figure(explanation.perplexity)}", fontsize=12)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def write_report(explanation: Explanation, out_dir: str | Path, *, title: str = "gptforge explain") -> dict[str, Any]:
    """Write explanation.json, surprisal.png, attention/layer_XX.png (all heads) and a self-contained index.html.

    Attention larger than MAX_EMBEDDED_ATTENTION values goes to attention.npy (float16) instead of the JSON
    and the page's interactive view.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {"json": out / "explanation.json", "html": out / "index.html",
                               "surprisal_png": out / "surprisal.png", "attention_png": []}
    embed = explanation.attentions is not None and explanation.attentions.numel() <= MAX_EMBEDDED_ATTENTION
    if explanation.attentions is not None and not embed:
        buffer = io.BytesIO()
        np.save(buffer, explanation.attentions.to(torch.float16).numpy(), allow_pickle=False)
        atomic_write_bytes(out / "attention.npy", buffer.getvalue())
        written["attention_npy"] = out / "attention.npy"
    atomic_write_text(written["json"], json.dumps(explanation.to_dict(include_attention=embed), indent=1))
    images: list[tuple[str, bytes]] = []
    if len(explanation.tokens) > 1:
        surprisal = surprisal_figure_png(explanation)
        atomic_write_bytes(written["surprisal_png"], surprisal)
        images.append(("Surprisal per token", surprisal))
    else:
        written["surprisal_png"] = None
    if explanation.attentions is not None:
        (out / "attention").mkdir(exist_ok=True)
        for layer, weights in enumerate(explanation.attentions):
            png = attention_figure_png(weights, explanation.token_strings, f"layer {layer}")
            path = out / "attention" / f"layer_{layer:02d}.png"
            atomic_write_bytes(path, png)
            written["attention_png"].append(path)
            images.append((f"Attention, layer {layer} (rows: queries, columns: keys)", png))
    atomic_write_text(written["html"], render_html(explanation, images, title=title, include_attention=embed))
    return written


def render_html(explanation: Explanation, images: Sequence[tuple[str, bytes]] = (), *,
                title: str = "gptforge explain", include_attention: bool = True) -> str:
    """A single HTML file (no external assets): tokens coloured by surprisal, hover for alternatives,
    an interactive attention view (pick layer/head, hover a token to see what it attends to), PNGs inline."""
    data = explanation.to_dict(include_attention=include_attention)
    payload = json.dumps(data).replace("</", "<\\/")  # safe inside <script>
    figures = "\n".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>" for caption, png in images)
    return _HTML_TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__FIGURES__", figures).replace(
        "__DATA__", payload)


_HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1100px;color:#222}
#tokens{font-family:ui-monospace,monospace;font-size:1.3em;white-space:pre-wrap;line-height:2.1;border:1px solid #ddd;padding:.8em}
.tok{padding:2px 1px;border-radius:3px;cursor:pointer;outline:1px solid #eee}
.tok.sel{outline:2px solid #000}
#info{font-family:ui-monospace,monospace;font-size:1.1em;white-space:pre-wrap;min-height:7em;background:#f7f7f7;padding:.6em;margin:.6em 0}
figure{margin:1em 0} figure img{max-width:100%} table{border-collapse:collapse} td,th{padding:2px 8px;border-bottom:1px solid #eee}
.controls{margin:.6em 0}
</style></head><body>
<h1>__TITLE__</h1>
<p id="summary"></p>
<h2>Tokens</h2>
<p>Colour: surprisal (white = expected, red = surprising). Hover or click a token for its log-probability and
the model's top alternatives; with the attention view on, colour shows what the selected token attends to.</p>
<div class="controls">View: <select id="mode"><option value="surprisal">surprisal</option>
<option value="attention">attention from selected token</option></select>
layer <select id="layer"></select> head <select id="head"></select></div>
<div id="tokens"></div>
<div id="info">Hover a token.</div>
<h2>Figures</h2>
__FIGURES__
<script id="data" type="application/json">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById('data').textContent);
const toks = data.tokens, att = data.attentions || null;
let selected = toks.length - 1;
document.getElementById('summary').textContent = toks.length + ' tokens; mean surprisal ' +
  (data.mean_surprisal_bits === null ? 'n/a' : data.mean_surprisal_bits.toFixed(2) + ' bits') +
  '; perplexity ' + (data.perplexity === null ? 'n/a' : data.perplexity.toFixed(2));
const layerSel = document.getElementById('layer'), headSel = document.getElementById('head');
const modeSel = document.getElementById('mode');
if (att) {
  att.forEach((_, i) => layerSel.add(new Option(i, i)));
  att[0].forEach((_, i) => headSel.add(new Option(i, i)));
} else { modeSel.disabled = true; }
const box = document.getElementById('tokens');
const spans = toks.map((t, i) => {
  const s = document.createElement('span'); s.className = 'tok'; s.textContent = t.token;
  s.onmouseenter = () => show(i); s.onclick = () => { selected = i; paint(); show(i); };
  box.appendChild(s); return s;
});
function fmt(x) { return x === null ? 'n/a' : x.toFixed(3); }
function pct(p) {
  const v = 100 * p;
  return v >= 99.95 ? '100%' : v >= 10 ? v.toFixed(v < 99 ? 0 : 1) + '%' : v >= 1 ? v.toFixed(1) + '%' :
    v >= 0.01 ? v.toFixed(2) + '%' : '<0.01%';
}
function show(i) {
  const t = toks[i];
  let lines = ['position ' + t.position + '  token ' + JSON.stringify(t.token) + ' (id ' + t.token_id + ')',
    'probability ' + (t.logprob === null ? 'n/a' : pct(Math.exp(t.logprob))) + '   log-prob ' + fmt(t.logprob) +
    ' nats   surprisal ' + fmt(t.surprisal_bits) + ' bits   rank ' + (t.rank ?? 'n/a')];
  if (t.top_alternatives.length) lines.push('expected: ' + t.top_alternatives.map(
    a => JSON.stringify(a.token) + ' ' + pct(Math.exp(a.logprob))).join('   '));
  document.getElementById('info').textContent = lines.join('\\n');
}
function paint() {
  const attention = modeSel.value === 'attention' && att;
  spans.forEach((s, i) => {
    s.classList.toggle('sel', attention && i === selected);
    let a;
    if (attention) a = att[+layerSel.value][+headSel.value][selected][i];
    else a = toks[i].surprisal_bits === null ? 0 : Math.min(toks[i].surprisal_bits / 12, 1);
    const hue = attention ? '30,100,220' : '220,60,40';
    s.style.background = 'rgba(' + hue + ',' + a.toFixed(3) + ')';
  });
}
[modeSel, layerSel, headSel].forEach(e => e.onchange = paint);
paint();
</script></body></html>
"""


def format_table(explanation: Explanation, top_k: int = 3) -> str:
    """A plain-text table: position, token, its probability, log-prob, surprisal, rank, the top alternatives.

    Whitespace in tokens is made visible (space '·', newline '↵', tab '⇥'); probabilities are percentages.
    """
    from .formatting import round_figure

    lines = [f"{'pos':>4}  {'token':<14} {'prob':>6} {'logprob':>8} {'bits':>6} {'rank':>5}  "
             f"the model expected (top {top_k})"]
    for t in explanation.tokens:
        alternatives = "  ".join(f"'{_label(a.token)}' {_percent(math.exp(a.logprob))}"
                                 for a in t.top_alternatives[:top_k])
        prob = "" if t.logprob is None else _percent(math.exp(t.logprob))
        lp = "" if t.logprob is None else f"{t.logprob:.3f}"
        bits = "" if t.surprisal_bits is None else f"{t.surprisal_bits:.2f}"
        rank = "" if t.rank is None else str(t.rank)
        token = f"'{_label(t.token, 12)}'"
        lines.append(f"{t.position:>4}  {token:<14} {prob:>6} {lp:>8} {bits:>6} {rank:>5}  {alternatives}".rstrip())
    predicted = len(explanation.tokens) - 1
    if predicted:
        lines.append(f"Mean surprisal {explanation.mean_surprisal_bits:.2f} bits per token, perplexity "
                     f"{round_figure(explanation.perplexity)}, over {predicted} predicted token"
                     f"{'s' if predicted != 1 else ''} (the first token has no context to be predicted from).")
    else:
        lines.append("One token only: nothing to predict (the first token has no context); give a longer text.")
    return "\n".join(lines)


__all__ = ["Alternative", "TokenExplanation", "Explanation", "attention_maps", "explain", "write_report",
           "render_html", "format_table", "attention_figure_png", "surprisal_figure_png"]
