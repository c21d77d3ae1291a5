"""What a training run shows on a terminal: configs/tiny.py run under a pseudo-terminal, its
final screen and one screen from mid-run (the progress bar below the metric lines), saved as
text and rendered as PNG "screenshots" (monospace text on a dark background, with Pillow).

Run from the repository root (no install needed):

    python benchmarks/progress_bar.py
    python benchmarks/progress_bar.py --columns 120 -- --config.train.steps=40

Writes benchmarks/results/progress_bar.txt, progress_bar.png (the final screen) and
progress_bar_midrun.png.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import tests.terminal` without installing

from tests.terminal import run_in_pty, screen  # noqa: E402

RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"


def midrun_screen(chunks: list[tuple[float, str]], columns: int) -> list[str]:
    """A screen from mid-run: the bar at the bottom, below at least one train line, at the
    step nearest half the run (the latest such screen of that step)."""
    best, text = None, ""
    for _, chunk in chunks:
        text += chunk
        rows = [row for row in screen(text, columns) if row]
        bar = re.match(r"\s*(\d+)/(\d+) .* eta ", rows[-1]) if rows else None
        if bar and any(" | train | loss" in row for row in rows):
            distance = abs(int(bar.group(1)) - int(bar.group(2)) / 2)
            if best is None or distance <= best[0]:
                best = (distance, rows)
    if best is None:
        raise SystemExit("no screen mid-run showed the bar below a train line: run more steps")
    return best[1]


def render(rows: list[str], path: str, columns: int) -> None:
    """Draws the rows as a terminal window would: light monospace text on a dark background."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(FONT, 15)
    # Each character in its own cell, as a terminal draws: drawn as one string, the glyphs'
    # fractional advances leave seams in the bar.
    cell_w, cell_h = int(font.getlength("M")), int(sum(font.getmetrics()) * 1.15)
    pad = 14
    image = Image.new("RGB", (columns * cell_w + 2 * pad, len(rows) * cell_h + 2 * pad), "#1e1e2e")
    draw = ImageDraw.Draw(image)
    for i, row in enumerate(rows):
        bar = "elapsed" in row
        for col, char in enumerate(row):
            fill = "#a6e3a1" if bar else "#cdd6f4"
            draw.text((pad + col * cell_w, pad + i * cell_h), char, font=font, fill=fill)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--columns", type=int, default=160, help="the terminal's width")
    parser.add_argument("flags", nargs="*", help="more jtrain.main flags (after --)")
    args = parser.parse_args()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JTRAIN_PROGRESS", None)  # the default: a bar, since stdout is a terminal
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "jtrain.main", "--config=configs/tiny.py"]
        command += [f"--workdir={workdir}", *args.flags]
        run = run_in_pty(command, env=env, cwd=REPO_ROOT, columns=args.columns)
    if run.returncode != 0:
        raise SystemExit(f"the run failed ({run.returncode}):\n{run.output[-3000:]}")
    final = screen(run.output, args.columns)
    while final and not final[-1]:
        final.pop()
    midrun = midrun_screen(run.chunks, args.columns)
    shown = " ".join(command[1:]).replace(workdir, "DIR")
    with open(os.path.join(RESULTS, "progress_bar.txt"), "w", encoding="utf-8") as f:
        f.write(f"$ python {shown}   # a {args.columns}-column terminal\n")
        f.write("\n".join(final) + "\n\n")
        f.write("--- mid-run (the bar under the metric lines, redrawn in place) ---\n")
        f.write("\n".join(midrun) + "\n")
    render(final, os.path.join(RESULTS, "progress_bar.png"), args.columns)
    render(midrun, os.path.join(RESULTS, "progress_bar_midrun.png"), args.columns)
    print("\n".join(final))


if __name__ == "__main__":
    main()
