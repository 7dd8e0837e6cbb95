"""Run the robovlms command line with one cell's evaluation hanging, so that a test can kill the process while that
cell runs, at a point it chose rather than at a moment it hoped to hit.

    python tests/hanging_cell.py CELL_PREFIX MARKER_FILE robovlms-arguments...

When the evaluation of the cell whose id starts with CELL_PREFIX begins (its training done and checkpointed),
MARKER_FILE is written and the process waits to be killed."""

import sys
import time
from pathlib import Path


def main() -> None:
    prefix, marker, *arguments = sys.argv[1:]
    import robovlms.rollout
    from robovlms.cli import main as robovlms_main

    evaluate = robovlms.rollout.evaluate

    def hang_in_one_cell(*args, description: str = "evaluation", **kwargs):
        if description.startswith(prefix):
            Path(marker).write_text(description)
            while True:
                time.sleep(60)
        return evaluate(*args, description=description, **kwargs)

    robovlms.rollout.evaluate = hang_in_one_cell
    sys.argv = ["robovlms", *arguments]
    robovlms_main()


if __name__ == "__main__":
    main()
