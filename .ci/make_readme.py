"""Write README.md from nbs/index.ipynb (the Quarto-free equivalent of `nbdev_readme`).

Usage: python .ci/make_readme.py          # write README.md
       python .ci/make_readme.py --check  # exit 1 if README.md is out of date
"""
import base64, json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nb = json.loads((root / "nbs" / "index.ipynb").read_text())
img_dir = root / "README_files"

def directives(src):
    return {m.group(1).strip() for m in re.finditer(r"^#\|\s*(.+)$", src, re.M)}

def render():
    parts, images = [], {}
    for i, cell in enumerate(nb["cells"]):
        src = "".join(cell["source"])
        d = directives(src)
        if "hide" in d or "include: false" in d: continue
        if cell["cell_type"] == "markdown":
            if i == 0:  # title + description, as nbdev renders them
                src = re.sub(r"^>\s*(.*)$", r"> \1", src, flags=re.M)
            parts.append(src.strip()); continue
        code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
        if code and "echo: false" not in d: parts.append(f"```python\n{code}\n```")
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append("```\n" + "".join(out["text"]).rstrip() + "\n```")
            elif "data" in out:
                data = out["data"]
                if "image/png" in data:
                    name = f"figure-{i}-{len(images)}.png"
                    images[name] = base64.b64decode(data["image/png"])
                    parts.append(f"![](README_files/{name})")
                elif "text/markdown" in data:
                    parts.append("".join(data["text/markdown"]).strip())
                elif "text/plain" in data:
                    parts.append("```\n" + "".join(data["text/plain"]).rstrip() + "\n```")
    text = "<!-- generated from nbs/index.ipynb by .ci/make_readme.py; edit the notebook -->\n\n" + "\n\n".join(parts) + "\n"
    return text, images

text, images = render()
readme = root / "README.md"
if "--check" in sys.argv:
    stale = not readme.exists() or readme.read_text() != text
    stale |= any(not (img_dir / n).exists() or (img_dir / n).read_bytes() != b for n, b in images.items())
    if stale: sys.exit("README.md is out of date with nbs/index.ipynb: run `python .ci/make_readme.py`")
    print("README.md is in sync with nbs/index.ipynb")
else:
    readme.write_text(text)
    if images:
        img_dir.mkdir(exist_ok=True)
        for old in img_dir.glob("figure-*.png"): old.unlink()
        for n, b in images.items(): (img_dir / n).write_bytes(b)
    print(f"wrote {readme} ({len(images)} figures)")
