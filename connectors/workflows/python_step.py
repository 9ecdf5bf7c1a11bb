"""Runs one python step in a process of its own (`python -I -S connectors/workflows/python_step.py`).

The request (`code`, `input`) comes on stdin as JSON; the outcome goes to the file named
by the first argument, so that whatever the code prints cannot garble it: `{"ok": true,
"result": ...}` or `{"ok": false, "error": ..., "traceback": ...}`. The code runs with
its input's keys as variables; a `main` it defines is called with the keys its
signature takes, and its return value is the result, else the `result` variable is.
The process starts without `site` (`-I -S`: no `.pth` files run, a few milliseconds a
step): the request's `path` (the runner's site-packages) goes at the end of `sys.path`, so
the libraries installed beside Sluice can still be imported. Only what a step needs of
the standard library is imported here, so a step starts quickly.
"""

from __future__ import annotations

import json
import sys


def _call(namespace: dict[str, object], given: dict[str, object]) -> object:
    main = namespace.get("main")
    if not callable(main):
        return namespace.get("result")
    import inspect  # noqa: PLC0415 - only a step with a main needs it

    params = inspect.signature(main).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return main(**given)
    return main(**{k: v for k, v in given.items() if k in params})


def run(out_path: str) -> None:
    request = json.load(sys.stdin)
    sys.path.extend(p for p in request.get("path") or () if p not in sys.path)
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
        import traceback  # noqa: PLC0415 - only a failed step needs it

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
