"""index.html: the card, its plots and a browsable sample of pairs, as one static page.

No server and no network: it opens from disk or object storage. The card's Markdown is rendered here
(markdown-it-py, which `rich` already depends on); the sample is embedded as JSON and drawn by a small
script; images are the relative files of samples/ and plots/. Texts are set with `textContent`, so a
model's answer cannot inject markup into the page.
"""

from __future__ import annotations

import html
import json
from typing import Any

from markdown_it import MarkdownIt

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #1f3b57; color: white; padding: 10px 24px; }
header a { color: #cfe3f7; margin-right: 16px; }
main { max-width: 1200px; margin: 0 auto; padding: 8px 24px 40px; }
#card img { max-width: 100%; border: 1px solid #ddd; background: white; }
#card table { border-collapse: collapse; margin: 6px 0 12px; }
#card td, #card th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
pre { background: #f0f0f0; padding: 8px; overflow-x: auto; }
#filters { position: sticky; top: 0; background: #eef3f8; padding: 8px; border: 1px solid #cdd9e5; z-index: 1;
           display: flex; flex-wrap: wrap; gap: 12px; align-items: center; }
#filters label { font-size: 13px; }
.pair { background: white; border: 1px solid #ddd; border-radius: 6px; margin: 12px 0; padding: 10px; }
.pair-head { display: flex; gap: 12px; }
.pair-head img.kept { width: 192px; height: auto; border: 1px solid #ccc; image-rendering: pixelated; }
.meta { font-size: 12px; color: #555; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; margin-top: 8px; }
.side { border-radius: 4px; padding: 6px 8px; white-space: pre-wrap; word-break: break-word; }
.side.chosen { background: #e8f1fa; border-left: 4px solid #2a7ab0; }
.side.rejected { background: #fbece8; border-left: 4px solid #d0583a; }
.side b { display: block; white-space: normal; }
.candidates { display: flex; gap: 6px; margin-top: 6px; flex-wrap: wrap; }
.candidate { font-size: 11px; text-align: center; border: 2px solid transparent; padding: 2px; }
.candidate.kept { border-color: #2a7ab0; }
.candidate img { width: 96px; height: auto; display: block; image-rendering: pixelated; }
"""

SCRIPT = """
const pairs = JSON.parse(document.getElementById('pairs-data').textContent);
const $ = (id) => document.getElementById(id);
const fmt = (x) => (x === null || x === undefined) ? 'n/a' : Number(x).toPrecision(3);
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
function fill(select, values) { for (const v of values) { const o = el('option', '', v); o.value = v; select.appendChild(o); } }
fill($('f-category'), [...new Set(pairs.map(p => p.category))].sort());
fill($('f-model'), [...new Set(pairs.flatMap(p => [p.chosen.model, p.rejected.model]))].sort());
fill($('f-kind'), [...new Set(pairs.map(p => p.negative_kind))].sort());
function side(kind, s) {
  const box = el('div', 'side ' + kind);
  box.appendChild(el('b', '', `${kind}: ${s.model}  ·  reward ${fmt(s.score)}  ·  ${s.words} words`));
  box.appendChild(document.createTextNode(s.text || ''));
  return box;
}
function render() {
  const category = $('f-category').value, model = $('f-model').value, kind = $('f-kind').value;
  const lo = parseFloat($('f-min').value), hi = parseFloat($('f-max').value);
  const shown = pairs.filter(p => (!category || p.category === category)
    && (!model || p.chosen.model === model || p.rejected.model === model)
    && (!kind || p.negative_kind === kind)
    && (isNaN(lo) || (p.margin !== null && p.margin >= lo)) && (isNaN(hi) || (p.margin !== null && p.margin <= hi)));
  $('f-count').textContent = `showing ${shown.length} of ${pairs.length} sampled pairs`;
  const list = $('pair-list'); list.replaceChildren();
  for (const p of shown) {
    const card = el('div', 'pair'); card.dataset.id = p.id; card.dataset.category = p.category;
    const head = el('div', 'pair-head');
    if (p.image) { const img = el('img', 'kept'); img.src = p.image; img.alt = 'kept image of ' + p.id; head.appendChild(img); }
    const info = el('div');
    info.appendChild(el('div', 'meta', `${p.id}  ·  category ${p.category}  ·  margin ${fmt(p.margin)}  ·  rejected: ${p.negative_kind}  ·  instruction: ${p.instruction_class}`));
    info.appendChild(el('div', 'meta', 'text-to-image prompt: ' + (p.t2i_prompt || '')));
    info.appendChild(el('p', 'instruction', p.instruction || ''));
    const strip = el('div', 'candidates');
    for (const c of p.candidates) {
      const box = el('div', 'candidate' + (c.kept ? ' kept' : ''));
      if (c.file) { const img = el('img'); img.src = c.file; img.alt = 'candidate at guidance ' + c.guidance_scale; box.appendChild(img); }
      box.appendChild(el('div', '', `g ${c.guidance_scale}${c.kept ? ' (kept)' : ''}`));
      box.appendChild(el('div', '', `IR ${fmt(c.image_score)}`));
      if (c.clip_score !== null) box.appendChild(el('div', '', `CLIP ${fmt(c.clip_score)}`));
      if (c.blip_score !== null) box.appendChild(el('div', '', `BLIP ${fmt(c.blip_score)}`));
      strip.appendChild(box);
    }
    info.appendChild(strip);
    head.appendChild(info); card.appendChild(head);
    const sides = el('div', 'sides'); sides.appendChild(side('chosen', p.chosen)); sides.appendChild(side('rejected', p.rejected));
    card.appendChild(sides);
    list.appendChild(card);
  }
}
// Filters live in the URL's hash too (index.html#category=city&min=0.1), so a filtered view can be shared.
// Two views, the card and the pairs: #view=pairs (or any filter in the hash) opens the pairs.
const FILTERS = {category: 'f-category', model: 'f-model', kind: 'f-kind', min: 'f-min', max: 'f-max'};
function fromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const [key, id] of Object.entries(FILTERS)) $(id).value = params.get(key) || '';
  const pairsView = params.get('view') === 'pairs' || Object.keys(FILTERS).some(key => params.has(key));
  $('card').hidden = pairsView; $('pairs').hidden = !pairsView;
}
function toHash() {
  const params = new URLSearchParams({view: 'pairs'});
  for (const [key, id] of Object.entries(FILTERS)) if ($(id).value) params.set(key, $(id).value);
  history.replaceState(null, '', '#' + params);
}
for (const id of Object.values(FILTERS)) $(id).addEventListener('input', () => { toHash(); render(); });
window.addEventListener('hashchange', () => { fromHash(); render(); });
fromHash();
render();
"""


def strip_front_matter(card: str) -> tuple[str, str]:
    """(YAML front matter, Markdown body) of a card."""
    if card.startswith("---\n"):
        end = card.index("\n---\n", 4)
        return card[4:end], card[end + 5 :]
    return "", card


def render_page(card: str, report: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    front, body = strip_front_matter(card)
    card_html = MarkdownIt("commonmark").enable("table").render(body)
    data = json.dumps(samples, ensure_ascii=False).replace("</", "<\\/")  # no "</script>" inside the data
    title = html.escape(report.get("run", "run"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Dataset report: {title}</title>
<style>{STYLE}</style></head>
<body>
<header><b>Dataset report</b> &nbsp; {title} &nbsp; <a href="#view=card">card</a><a href="#view=pairs">pairs</a><a href="stats.json">stats.json</a><a href="README.md">README.md</a></header>
<main>
<section id="card">{card_html}
<details><summary>Card metadata (YAML front matter)</summary><pre>{html.escape(front)}</pre></details>
</section>
<section id="pairs" hidden><h2>Sample of pairs</h2>
<p>A uniform sample of {len(samples)} of the run's {report['rows']['pairs']} pairs (the pairs with the smallest hashes of
their id). Reward = the reward model's score (<code>response_scores</code>); margin in the units of <code>pairs.rank_by</code>. The candidate images
show each scorer's score; the kept one is framed.</p>
<div id="filters">
<label>category <select id="f-category"><option value="">all</option></select></label>
<label>model (chosen or rejected) <select id="f-model"><option value="">all</option></select></label>
<label>rejected kind <select id="f-kind"><option value="">all</option></select></label>
<label>margin from <input id="f-min" type="number" step="any" size="8"></label>
<label>to <input id="f-max" type="number" step="any" size="8"></label>
<span id="f-count"></span>
</div>
<div id="pair-list"></div>
</section>
</main>
<script type="application/json" id="pairs-data">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""
