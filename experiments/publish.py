"""Publish the grid's seed-0 models to the zoo, then rewrite the README's zoo table from the cards.

Every finished seed-0 run of the grid (``experiments/sweep.py``) whose model is on
this machine and which was never published is exported with
``iterconv export RUN --name NAME`` under the name `NAMES` gives its condition
(a new version where the name exists). ``GRID/published.json`` records each
export (run, relative to the grid -> ``NAME@VERSION``) as it happens and keeps
the record when a version is later retired, so a retired version is never
silently re-exported as a newer default. The README's zoo table (one row per
name: its default version) is then rewritten from the cards, so it cannot
disagree with them (tests/test_repo_zoo.py checks that it does not); it is
rewritten even when an export failed, from the versions that exist.

Usage:
    python experiments/publish.py --grid experiments/grid --zoo zoo --readme README.md
    python experiments/publish.py --dry-run      # say what would be exported, change nothing

Exit codes: 0 done, 1 an export failed (those before it stay published and
recorded), 2 usage error (no grid, no zoo, no README or no zoo table in it, a
malformed record): one line on stderr, nothing exported or written.
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


RECORD = "published.json"


def exportable_runs(grid):
    """``[(run, name)]``: finished seed-0 runs with a local model, in `NAMES` order.

    ``run`` is the run directory relative to ``grid`` (``DATASET/CONDITION-s0``).
    """
    found = []
    for (dataset, condition), name in NAMES.items():
        run = f"{dataset}/{condition}-s0"
        if all(os.path.isfile(os.path.join(grid, run, f)) for f in ("model.keras", "metrics.json", "eval.json")):
            found.append((run, name))
    return found


def read_record(grid):
    """run (relative to the grid) -> list of ``NAME@VERSION`` it was published as.

    Raises:
        ValueError: the record is not JSON mapping run paths to lists of references.
    """
    path = os.path.join(grid, RECORD)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(record, dict) or not all(
            isinstance(run, str) and isinstance(refs, list) and all(isinstance(r, str) for r in refs)
            for run, refs in record.items()):
        raise ValueError(f"{path} must map run paths to lists of NAME@VERSION strings")
    return record


def record_export(grid, run, reference):
    """Add ``reference`` (``NAME@VERSION``) to the record of ``run``, atomically."""
    from iterconv_keras import fsutil

    record = read_record(grid)
    record.setdefault(run, []).append(reference)
    fsutil.write_json_atomic(os.path.join(grid, RECORD), record, sort_keys=True)


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
        raise ValueError("no zoo table (its header row) in the README")
    start = rows.index(TABLE_HEADER)
    end = start
    while end < len(rows) and rows[end].strip():
        end += 1
    return "\n".join(rows[:start] + lines + rows[end:])


def export(grid, zoo_root, run, name):
    """Export one run with the CLI and record it; ValueError (one line) when either step fails."""
    result = subprocess.run([sys.executable, "-m", "iterconv_cli.main", "export", os.path.join(grid, run),
                             "--name", name, "--zoo", zoo_root, "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise ValueError(f"exporting {run} failed: {last}")
    try:
        exported = json.loads(result.stdout)
        reference = f"{exported['name']}@{exported['version']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{run} was exported but its version could not be read from the export's output; "
                         f"find it with 'iterconv zoo list' and add it to {RECORD} by hand") from None
    try:
        record_export(grid, run, reference)
    except OSError as error:
        raise ValueError(f"{run} was exported as {reference} but not recorded ({error.strerror}); "
                         f"add it to {os.path.join(grid, RECORD)} by hand") from None
    return reference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="experiments/grid")
    parser.add_argument("--zoo", default="zoo")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--dry-run", action="store_true", help="say what would be exported; change nothing")
    args = parser.parse_args(argv)
    try:  # checked before anything is exported
        if not os.path.isdir(args.grid):
            raise ValueError(f"no grid at {args.grid}")
        if not os.path.isdir(args.zoo):  # a mistyped --zoo must not empty the README's table
            raise ValueError(f"no zoo folder at {args.zoo}; pass --zoo DIR (an empty folder for a new zoo)")
        try:
            with open(args.readme) as f:
                readme = f.read()
        except OSError as error:
            raise ValueError(f"cannot read {args.readme}: {error.strerror}") from None
        replace_table(readme, [])
        published = read_record(args.grid)
    except ValueError as error:
        print(f"publish: {error}", file=sys.stderr)
        return 2
    todo = [(run, name) for run, name in exportable_runs(args.grid) if run not in published]
    code = 0
    try:
        for run, name in todo:
            print(f"publish: {run} -> {name}" + (" (dry run)" if args.dry_run else ""), file=sys.stderr)
            if not args.dry_run:
                print(f"publish: {export(args.grid, args.zoo, run, name)}", file=sys.stderr)
    except ValueError as error:
        print(f"publish: {error}", file=sys.stderr)
        code = 1
    finally:
        if not args.dry_run:  # the table follows the zoo as it is, failed export or not
            from iterconv_keras import fsutil

            fsutil.write_text_atomic(args.readme, replace_table(readme, zoo_table(args.zoo)))
    return code


if __name__ == "__main__":
    sys.exit(main())
