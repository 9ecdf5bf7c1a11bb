"""Runs one python step in a process of its own (`python -I connectors/workflows/python_step.py`).

The request (`code`, `input`) comes on stdin as JSON; the outcome goes to the file named
by the first argument, so that whatever the code prints cannot garble it: `{"ok": true,
"result": ...}` or `{"ok": false, "error": ..., "traceback": ...}`. The code runs with
its input's keys as variables; a `main` it defines is called with the keys its
signature takes, and its return value is the result, else the `result` variable is.
Only the standard library is imported here, so a step starts quickly.
"""

from __future__ import annotations

import inspect
import json
import sys
import traceback


def _call(namespace: dict[str, object], given: dict[str, object]) -> object:
    main = namespace.get("main")
    if not callable(main):
        return namespace.get("result")
    params = inspect.signature(main).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return main(**given)
    return main(**{k: v for k, v in given.items() if k in params})


def run(out_path: str) -> None:
    request = json.load(sys.stdin)
    given = dict(request.get("input") or {})
    namespace: dict[str, object] = {"__name__": "__step__", **given}
    try:
        exec(compile(request["code"], "<step>", "exec"), namespace)  # noqa: S102 - the step's code
        value = _call(namespace, given)
        try:
            text = json.dumps({"ok": True, "result": value}, allow_nan=False)
        except (TypeError, ValueError) as exc:
            text = json.dumps({"ok": False, "error": f"the result is not JSON: {exc}"})
    except BaseException as exc:  # the step's failure, whatever it is, is its outcome
        lines = traceback.format_exception(exc)
        text = json.dumps(
            {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": "".join(lines[-3:])[-2000:],
            }
        )
    with open(out_path, "w", encoding="utf-8") as out:
        out.write(text)


if __name__ == "__main__":
    run(sys.argv[1])
