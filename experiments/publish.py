"""Publish the grid's seed-0 models to the zoo, then rewrite the README's zoo table from the cards.

Every finished seed-0 run of the grid (``experiments/sweep.py``) whose model is on
this machine and which no live zoo version came from yet is exported with
``iterconv export RUN --name NAME`` under the name `NAMES` gives its condition
(a new version where the name exists). A version's card records its source run,
so "already published" is read from the zoo itself. The README's zoo table (one
row per name: its default version) is then rewritten from the cards, so it can
never disagree with them (tests/test_repo_zoo.py checks that it does not).

Usage:
    python experiments/publish.py --grid experiments/grid --zoo zoo --readme README.md
    python experiments/publish.py --dry-run      # say what would be exported, change nothing

Exit codes: 0 done, 1 an export failed, 2 usage error (no grid, no table in the README).
"""

import argparse
import json
import os
import subprocess
import sys

# (dataset, condition) -> zoo name. The four corners keep the names the 0.1 zoo gave them.
NAMES = {
    ("digitclutter", "l0"): "digitclutter-small",
    ("digitclutter", "l1"): "digitclutter-small-recurrent",
    ("digitclutter", "sn-l0"): "digitclutter-small-lipschitz",
    ("digitclutter", "sn-l1"): "digitclutter-small-recurrent-lipschitz",
    ("digitclutter", "conventional"): "digitclutter-small-conventional",
    ("digitclutter", "contractive-l0"): "digitclutter-small-contractive",
    ("digitclutter", "contractive-l1"): "digitclutter-small-recurrent-contractive",
    ("digitclutter", "l0.5"): "digitclutter-small-coupling0.5",
    ("digitclutter", "l0.9"): "digitclutter-small-coupling0.9",
    ("digitclutter", "l0.99"): "digitclutter-small-coupling0.99",
    ("fashion_mnist", "l0"): "fashion-mnist-small",
    ("fashion_mnist", "l1"): "fashion-mnist-small-recurrent",
    ("fashion_mnist", "sn-l0"): "fashion-mnist-small-lipschitz",
    ("fashion_mnist", "sn-l1"): "fashion-mnist-small-recurrent-lipschitz",
    ("fashion_mnist", "conventional"): "fashion-mnist-small-conventional",
    ("fashion_mnist", "contractive-l0"): "fashion-mnist-small-contractive",
    ("fashion_mnist", "contractive-l1"): "fashion-mnist-small-recurrent-contractive",
    ("fashion_mnist", "l0.5"): "fashion-mnist-small-coupling0.5",
    ("fashion_mnist", "l0.9"): "fashion-mnist-small-coupling0.9",
    ("fashion_mnist", "l0.99"): "fashion-mnist-small-coupling0.99",
}
TABLE_HEADER = ("| name | version | dataset | coupling | Lipschitz | test accuracy | RI | DI | "
                "convergence rate per stage | occlusion AUC |")


def exportable_runs(grid):
    """``[(run_dir, name)]``: finished seed-0 runs with a local model, in `NAMES` order."""
    found = []
    for (dataset, condition), name in NAMES.items():
        run_dir = os.path.join(grid, dataset, f"{condition}-s0")
        if all(os.path.isfile(os.path.join(run_dir, f)) for f in ("model.keras", "metrics.json", "eval.json")):
            found.append((run_dir, name))
    return found


def published_sources(zoo_root):
    """Source paths (as the cards hold them) of every live zoo version."""
    from iterconv_keras import zoo

    sources = set()
    for entry in zoo.list_pretrained(zoo_root):
        for version in entry["versions"]:
            card = zoo.show(f"{entry['name']}@{version}", zoo_root)["card"].to_json()
            if card.get("source"):
                sources.add(os.path.normpath(card["source"]))
    return sources


def is_published(run_dir, sources):
    """Whether a live version came from ``run_dir`` (cards hold absolute paths of the machine
    that exported them, so the grid-relative tail ``DATASET/CONDITION-sSEED`` is compared)."""
    tail = os.path.join(*os.path.normpath(os.path.abspath(run_dir)).split(os.sep)[-2:])
    return any(source.endswith(os.sep + tail) for source in sources)


def _dataset_title(card):
    recipe = card.get("recipe") or {}
    if card["dataset"] == "digitclutter":
        return f"Digitclutter, {recipe.get('clutter_digits', 3)} digits"
    if card["dataset"] == "digitdebris":
        return f"digit debris, {recipe.get('debris_fragments', 10)} fragments"
    return {"fashion_mnist": "Fashion-MNIST"}.get(card["dataset"], card["dataset"])


def table_row(card, version):
    """The README row of one zoo version, from its card."""
    indices = card["indices"]
    rates = [s.get("convergence_rate") for s in indices["per_stage"]]
    bound = card["constraint"]["lipschitz"]
    return (f"| `{card['name']}` | {version} | {_dataset_title(card)} | {card['coupling']:g} | "
            f"{'-' if bound is None else f'{bound:g}'} | {card['metrics']['accuracy']:.3f} | "
            f"{indices['recurrence']:.2f} | {indices['divergence']:.2f} | "
            f"{'-' if None in rates else ' / '.join(f'{r:.2f}' for r in rates)} | {card['occlusion_auc']:.2f} |")


def zoo_table(zoo_root):
    """The README's zoo table: one row per name (its default version), grid names in `NAMES` order."""
    from iterconv_keras import zoo

    order = list(NAMES.values())
    entries = sorted(zoo.list_pretrained(zoo_root),
                     key=lambda e: (order.index(e["name"]) if e["name"] in order else len(order), e["name"]))
    lines = [TABLE_HEADER, "|" + "---|" * (TABLE_HEADER.count("|") - 1)]
    for entry in entries:
        version = entry["default_version"]
        card = zoo.show(f"{entry['name']}@{version}", zoo_root)["card"].to_json()
        lines.append(table_row(card, version))
    return lines


def replace_table(readme, lines):
    """``readme`` with the zoo table (from its header to the next blank line) replaced by ``lines``."""
    rows = readme.split("\n")
    if TABLE_HEADER not in rows:
        raise ValueError("no zoo table (its header row) found")
    start = rows.index(TABLE_HEADER)
    end = start
    while end < len(rows) and rows[end].strip():
        end += 1
    return "\n".join(rows[:start] + lines + rows[end:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="experiments/grid")
    parser.add_argument("--zoo", default="zoo")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--dry-run", action="store_true", help="say what would be exported; change nothing")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.grid):
        print(f"publish: no grid at {args.grid}", file=sys.stderr)
        return 2
    with open(args.readme) as f:
        readme = f.read()
    if TABLE_HEADER not in readme.split("\n"):  # checked before anything is exported
        print(f"publish: {args.readme}: no zoo table (its header row) found", file=sys.stderr)
        return 2
    sources = published_sources(args.zoo)
    todo = [(run, name) for run, name in exportable_runs(args.grid) if not is_published(run, sources)]
    for run_dir, name in todo:
        print(f"publish: {run_dir} -> {name}" + (" (dry run)" if args.dry_run else ""), file=sys.stderr)
        if args.dry_run:
            continue
        result = subprocess.run([sys.executable, "-m", "iterconv_cli.main", "export", run_dir, "--name", name,
                                 "--zoo", args.zoo, "--json"], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"publish: exporting {run_dir} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        exported = json.loads(result.stdout)
        print(f"publish: {exported.get('name')}@{exported.get('version')}", file=sys.stderr)
    if not args.dry_run:
        updated = replace_table(readme, zoo_table(args.zoo))
        temporary = f"{args.readme}.tmp-{os.getpid()}"
        with open(temporary, "w") as f:
            f.write(updated)
        os.replace(temporary, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
