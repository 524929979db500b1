"""`gptforge feedback export`: the feedback database -> a preference dataset and an SFT dataset.

    gptforge feedback export --db runs/x/feedback.db --out prefs.jsonl [--sft-out sft.jsonl] [--model NAME] [--json]
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `gptforge feedback`."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = sub.add_parser("export", help="write preference pairs (prompt, chosen, rejected) and SFT examples",
                            description="Write preference pairs (prompt, chosen, rejected) and SFT examples "
                                        "(prompt, good answer) from the feedback the server stored.")
    export.add_argument("--db", required=True,
                        help="the feedback database: a SQLite file (gptforge serve writes feedback.db beside the "
                             "model) or a postgresql:// URL")
    export.add_argument("--out", required=True, help="preference dataset (JSONL)")
    export.add_argument("--sft-out", default=None, help="SFT dataset (JSONL; default: OUT with .sft before .jsonl)")
    export.add_argument("--model", default=None, help="only feedback about this served model name")
    export.add_argument("--json", action="store_true", help="print the counts as JSON")


def run(args: argparse.Namespace) -> int:
    """Export and print what was written."""
    from pathlib import Path

    from ..feedback.export import default_sft_path, export_feedback
    from ..feedback.store import FeedbackDBError, FeedbackStore

    db = str(args.db)
    if "://" not in db and not Path(db).is_file():
        raise FeedbackDBError(f"--db {db}: no such database file (gptforge serve writes feedback.db beside the model, "
                              "or where --feedback-db says)")
    store = FeedbackStore.open(db, migrate=False)
    try:
        if store.schema_version() == 0:
            raise FeedbackDBError(f"--db {store.name}: not a gptforge feedback database (no schema table)")
        store.migrate()  # an older schema is brought up to date before reading
        rows = store.feedback(model=args.model)
    finally:
        store.close()
    sft_path = Path(args.sft_out) if args.sft_out else default_sft_path(args.out)
    summary = export_feedback(rows, args.out, sft_path)
    if args.json:
        print(json.dumps({**summary.as_dict(), "out": str(args.out), "sft_out": str(sft_path)}, indent=2))
    else:
        print("\n".join(summary.sentences(Path(args.out), sft_path)))
    return 0
