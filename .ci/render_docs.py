"""Prepare the Quarto sources with nbdev and render every notebook to HTML with nbconvert.

Quarto is what builds the real site (`nbdev_docs` / `nbdev_preview`); where it cannot be installed this checks
what can be checked: the steps of `nbdev_proc_nbs` (less its Quarto install) run cleanly, every notebook renders to HTML with its stored outputs,
no stored output is an error, and every cell that draws a figure has an image in its output.
The site config must list every notebook. Output: _docs_html/ (gitignored).
"""
import json, re, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nbs = sorted(p for p in (root / "nbs").glob("*.ipynb") if not p.name.startswith("_"))
out = root / "_docs_html"
out.mkdir(exist_ok=True)
problems = []

# nbdev_proc_nbs minus its Quarto install: the same steps nbdev_docs runs before `quarto render`
import os
os.chdir(root)
from nbdev.quarto import refresh_quarto_yml
from nbdev.doclinks import _build_modidx
from nbdev.serve import proc_nbs
refresh_quarto_yml()
_build_modidx()
proc_nbs(root / "nbs", force=True, n_workers=0)
sys.stdout.flush()
proc = root / "_proc"
sidebar = (root / "nbs" / "sidebar.yml").read_text()

draws = re.compile(r"\b(plt\.(subplots|figure|plot|hist|bar|scatter|imshow)\(|sns\.(?!set)\w+\(|\.plot\(|plot_[a-z_]+\(|imshow\()")
for nb_path in nbs:
    if nb_path.name not in sidebar: problems.append(f"{nb_path.name}: not listed in nbs/sidebar.yml")
    nb = json.loads(nb_path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code": continue
        src = "".join(cell["source"])
        outs = cell.get("outputs", [])
        for o in outs:
            if o.get("output_type") == "error":
                problems.append(f"{nb_path.name} cell {i}: stored error output {o.get('ename')}: {o.get('evalue')}")
            if o.get("output_type") == "stream" and o.get("name") == "stderr" and "Traceback" in "".join(o.get("text", "")):
                problems.append(f"{nb_path.name} cell {i}: a traceback in stderr")
        code = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("#", "def ", "import", "from ")))
        if draws.search(code) and "#| export" not in src and "eval: false" not in src:
            if not any("image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {}) for o in outs):
                problems.append(f"{nb_path.name} cell {i}: draws a figure but has no image output (run the notebook and commit its outputs)")
    processed = proc / nb_path.name
    src = processed if processed.exists() else nb_path
    r = subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--output-dir", str(out), str(src)],
                       cwd=root, capture_output=True, text=True)
    if r.returncode != 0: problems.append(f"{nb_path.name}: nbconvert failed: {r.stderr.strip()[-500:]}")
    else:
        html = (out / (nb_path.stem + ".html")).read_text()
        n_img = html.count("<img")
        print(f"rendered {nb_path.name:28s} {n_img:3d} images", flush=True)

if problems:
    print("\n".join(["doc render problems:"] + problems), file=sys.stderr)
    sys.exit(1)
print(f"{len(nbs)} notebooks rendered to {out.relative_to(root)}/")
