"""The review page of a tagging run: review.html beside tags.parquet, and review/ with a thumbnail of each photo to
review and rows.js, the rows the page lists. It opens offline from the folder (nothing fetched from outside: no
server, no library), from a bucket once downloaded.

The page lists the photos to review (those whose confidence is below --review-threshold), least confident first:
the thumbnail, the path, the model's tag and its top 3 with probabilities, and a choice of the model's classes,
"none of these" and "skip". Keyboard first: a digit picks a class (1 the first, 0 the tenth), Enter accepts the
model's tag, n is none of these, s skips, Backspace clears, the arrows move; a count of the reviewed of the total
always shown; the answers kept in the browser's storage (localStorage, under the run's id), so a reload loses
nothing. Export saves corrections.csv (`path,label`, a row per answered photo, its original path or URI; "none of
these" as the label NONE_OF_THESE, which training leaves out: `jobs/train.py --train-data CATALOG --train-data
corrections.csv`). Files that could not be read are listed apart, with their error. A virtual list: only the rows
in view are in the page, and their thumbnails load as they come into view, so 50,000 rows stay responsive.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from clf.catalog import NONE_OF_THESE

PAGE_NAME = "review.html"
FOLDER = "review"  # beside it: the thumbnails and rows.js
ROWS = "rows.js"


class ReviewPage:
    """Collects, block by block as tagging's rows arrive, the photos to review (writing their thumbnails into
    review/) and the files that could not be read; `write` then writes rows.js and review.html."""

    def __init__(self, output: Path, classes: list[str]):
        self.output, self.classes = output, classes
        self.rows: list[list] = []  # [index, path, thumbnail, confidence, tag1, p1, tag2, p2, tag3, p3]
        self.errors: list[list] = []  # [path, error]
        (output / FOLDER).mkdir()

    def add(self, rows: pd.DataFrame, thumbnails: np.ndarray) -> None:
        """A block of tags' rows (`index`, `path`, the tags' columns) and each row's thumbnail (JPEG bytes)."""
        for row, thumbnail in zip(rows[rows["needs_review"]].itertuples(index=False), thumbnails[rows["needs_review"]]):
            name = f"{row.index:012d}.jpg"
            (self.output / FOLDER / name).write_bytes(thumbnail)
            self.rows.append([int(row.index), row.path, name, round(float(row.confidence), 6),
                              *(value for k in (1, 2, 3) for value in (getattr(row, f"top{k}"),
                                                                       round(float(getattr(row, f"top{k}_prob")), 6)))])
        failed = rows[rows["error"] != ""]
        self.errors += [[path, error] for path, error in zip(failed["path"], failed["error"])]

    def write(self) -> int:
        """rows.js and review.html; the number of photos to review."""
        self.rows.sort(key=lambda row: (row[3], row[0]))  # least confident first
        run = hashlib.sha256(json.dumps([self.classes, self.rows]).encode()).hexdigest()[:16]
        document = {"run": run, "classes": self.classes, "none": NONE_OF_THESE, "rows": self.rows,
                    "errors": self.errors}
        (self.output / FOLDER / ROWS).write_text(f"window.CLF_REVIEW = {json.dumps(document)};\n")
        (self.output / PAGE_NAME).write_text(PAGE.render(rows=f"{FOLDER}/{ROWS}", folder=FOLDER, count=len(self.rows)))
        return len(self.rows)


PAGE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>clf review: {{ count }} photos</title>
<style>
* { box-sizing: border-box; }
body { font-family: sans-serif; margin: 0; color: #222; }
header { position: sticky; top: 0; background: #f4f4f4; border-bottom: 1px solid #ccc; padding: 0.5em 1em; z-index: 2; }
header .counts { font-size: 1.2em; font-weight: bold; margin-right: 1em; }
header button, header select, header label { margin-left: 0.6em; }
#keys { color: #555; font-size: 0.85em; margin-top: 0.3em; }
kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 0.25em; background: #fff; }
#list { position: relative; overflow-y: auto; height: calc(100vh - 8.5em); }
#spacer { position: relative; }
.row { position: absolute; left: 0; right: 0; height: 176px; display: flex; gap: 1em; padding: 8px 1em;
       border-bottom: 1px solid #eee; }
.row.current { background: #eef4ff; outline: 2px solid #4a7bd0; outline-offset: -2px; }
.row img { width: 160px; height: 160px; object-fit: contain; background: #fff; border: 1px solid #ddd; flex: none; }
.info { flex: 1; min-width: 0; }
.path { font-family: monospace; font-size: 0.8em; color: #555; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.model { margin: 0.3em 0; }
.choices button { margin: 0.15em; padding: 0.2em 0.5em; border: 1px solid #bbb; background: #fff; border-radius: 4px; cursor: pointer; }
.choices button.chosen { background: #2d6a2d; color: #fff; border-color: #2d6a2d; }
.choices button.suggested { border-color: #4a7bd0; }
.answer { font-weight: bold; }
#errors { margin: 1em; }
#errors td { padding: 0.1em 0.6em; font-family: monospace; font-size: 0.85em; }
</style>
</head>
<body>
<header>
<span class="counts"><span id="reviewed">0</span> of <span id="total">{{ count }}</span> reviewed</span>
<label>model's tag <select id="filter"><option value="">all</option></select></label>
<label><input type="checkbox" id="unanswered"> unanswered only</label>
<button id="export">Export corrections.csv</button>
<div id="keys"><kbd>1</kbd>…<kbd>9</kbd> <kbd>0</kbd> a class · <kbd>Enter</kbd> the model's tag ·
<kbd>n</kbd> none of these · <kbd>s</kbd> skip · <kbd>Backspace</kbd> clear · <kbd>↑</kbd> <kbd>↓</kbd> move ·
<kbd>Home</kbd> <kbd>End</kbd> · <span id="where"></span></div>
</header>
<div id="list" tabindex="0"><div id="spacer"></div></div>
<details id="errors"><summary><span id="error-count">0</span> files could not be read</summary><table></table></details>
<script src="{{ rows }}"></script>
<script>
"use strict";
const DATA = window.CLF_REVIEW, ROW_HEIGHT = 176, SKIP = "(skip)";
const KEY = "clf-review:" + DATA.run;
const answers = JSON.parse(localStorage.getItem(KEY) || "{}");  // path -> a class, DATA.none or SKIP
let view = [], current = 0;
const list = document.getElementById("list"), spacer = document.getElementById("spacer");

function save() { localStorage.setItem(KEY, JSON.stringify(answers)); }
function counts() {
  document.getElementById("reviewed").textContent = DATA.rows.filter(r => r[1] in answers).length;
}
function filtered() {
  const tag = document.getElementById("filter").value, open = document.getElementById("unanswered").checked;
  view = DATA.rows.map((r, i) => i).filter(i => (!tag || DATA.rows[i][4] === tag) && (!open || !(DATA.rows[i][1] in answers)));
  current = Math.min(current, Math.max(view.length - 1, 0));
  spacer.style.height = (view.length * ROW_HEIGHT) + "px";
  render();
}
function pct(p) { return (100 * p).toFixed(1) + "%"; }
function rowElement(position) {
  const r = DATA.rows[view[position]], div = document.createElement("div");
  div.className = "row" + (position === current ? " current" : "");
  div.style.top = (position * ROW_HEIGHT) + "px";
  div.dataset.position = position;
  div.dataset.path = r[1];
  const img = document.createElement("img");
  img.loading = "lazy"; img.alt = "photo " + (view[position] + 1); img.src = "{{ folder }}/" + r[2];
  const info = document.createElement("div"); info.className = "info";
  const path = document.createElement("div"); path.className = "path"; path.textContent = r[1]; path.title = r[1];
  const model = document.createElement("div"); model.className = "model";
  model.textContent = "model: " + r[4] + " " + pct(r[5]) + " · then " + r[6] + " " + pct(r[7]) + ", " + r[8] + " " + pct(r[9]);
  const choices = document.createElement("div"); choices.className = "choices";
  const options = DATA.classes.map((c, i) => [c, i < 10 ? String((i + 1) % 10) : ""]).concat([[DATA.none, "n"], [SKIP, "s"]]);
  for (const [label, key] of options) {
    const b = document.createElement("button");
    b.textContent = (key ? key + " " : "") + label;
    b.dataset.label = label;
    if (answers[r[1]] === label) b.classList.add("chosen");
    if (label === r[4]) b.classList.add("suggested");
    b.addEventListener("click", event => { event.stopPropagation(); current = position; answer(label); });
    choices.appendChild(b);
  }
  const chosen = document.createElement("div"); chosen.className = "answer";
  chosen.textContent = r[1] in answers ? "answer: " + answers[r[1]] : "";
  info.append(path, model, choices, chosen);
  div.append(img, info);
  div.addEventListener("click", () => { current = position; render(); });
  return div;
}
function render() {
  const first = Math.max(0, Math.floor(list.scrollTop / ROW_HEIGHT) - 3);
  const last = Math.min(view.length, first + Math.ceil(list.clientHeight / ROW_HEIGHT) + 6);
  spacer.replaceChildren(...Array.from({length: Math.max(0, last - first)}, (_, k) => rowElement(first + k)));
  document.getElementById("where").textContent = view.length ? "photo " + (current + 1) + " of " + view.length + " listed" : "nothing listed";
  counts();
}
function show(position) {
  current = Math.max(0, Math.min(position, view.length - 1));
  const top = current * ROW_HEIGHT;
  if (top < list.scrollTop) list.scrollTop = top;
  else if (top + ROW_HEIGHT > list.scrollTop + list.clientHeight) list.scrollTop = top + ROW_HEIGHT - list.clientHeight;
  render();
}
function answer(label) {
  if (!view.length) return;
  const path = DATA.rows[view[current]][1];
  if (label === null) delete answers[path]; else answers[path] = label;
  save();
  if (label !== null) show(current + 1); else render();
}
document.addEventListener("keydown", event => {
  if (event.target.tagName === "SELECT" || event.ctrlKey || event.metaKey || event.altKey) return;
  const k = event.key, r = view.length ? DATA.rows[view[current]] : null;
  let handled = true;
  if (k === "ArrowDown" || k === "j") show(current + 1);
  else if (k === "ArrowUp" || k === "k") show(current - 1);
  else if (k === "PageDown") show(current + Math.floor(list.clientHeight / ROW_HEIGHT));
  else if (k === "PageUp") show(current - Math.floor(list.clientHeight / ROW_HEIGHT));
  else if (k === "Home") show(0);
  else if (k === "End") show(view.length - 1);
  else if (/^[0-9]$/.test(k)) { const i = (Number(k) + 9) % 10; if (i < DATA.classes.length) answer(DATA.classes[i]); }
  else if (k === "Enter" && r) answer(r[4]);
  else if (k === "n") answer(DATA.none);
  else if (k === "s") answer(SKIP);
  else if (k === "Backspace" || k === "Delete") answer(null);
  else handled = false;
  if (handled) event.preventDefault();
});
function csvField(value) { return /[",\\r\\n]/.test(value) ? '"' + value.replace(/"/g, '""') + '"' : value; }
document.getElementById("export").addEventListener("click", () => {
  const lines = ["path,label"].concat(DATA.rows.filter(r => r[1] in answers && answers[r[1]] !== SKIP)
                                               .map(r => csvField(r[1]) + "," + csvField(answers[r[1]])));
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([lines.join("\\n") + "\\n"], {type: "text/csv"}));
  link.download = "corrections.csv";
  document.body.appendChild(link); link.click(); link.remove();
});
const filter = document.getElementById("filter");
for (const c of DATA.classes) { const o = document.createElement("option"); o.value = o.textContent = c; filter.appendChild(o); }
filter.addEventListener("change", () => { current = 0; filtered(); });
document.getElementById("unanswered").addEventListener("change", () => { current = 0; filtered(); });
list.addEventListener("scroll", render);
window.addEventListener("resize", render);
document.getElementById("error-count").textContent = DATA.errors.length;
document.querySelector("#errors table").replaceChildren(...DATA.errors.map(([path, error]) => {
  const tr = document.createElement("tr"), a = document.createElement("td"), b = document.createElement("td");
  a.textContent = path; b.textContent = error; tr.append(a, b); return tr;
}));
filtered();
list.focus();
</script>
</body>
</html>
""")
