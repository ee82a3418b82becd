"""The bootstrap that runs *inside* the sandbox (passed to the interpreter with -c; never imported by the host).

It applies the resource limits to itself, then serves cells: each request from the host is executed in one
persistent namespace (so a Session keeps its definitions) and answered with one reply frame. A request
marked final ends the process afterwards with the program's exit code, like `python main.py` would.
Stdlib only: the host package is not visible in the sandbox.

For code grading (see oneshot.run_tests) two more requests exist. In the solution's sandbox, a *call*
request calls one of the program's functions and replies with its result as a plain value (encode_value);
nothing here is trusted by the host, which decodes the reply itself. In the checker's sandbox, a cell may
bind *proxies*: functions that send their arguments to the host as a call frame and return the host's
answer, so the tests run against the solution without sharing a process with it.

Frames: 4-byte big-endian length, then the body -- marshal from the host (trusted, and free to import),
JSON to the host (which must parse it safely: the program can write to that pipe too).
Start-up cost matters (it is paid by every run()), so modules are imported only when needed: ast for
echoing a trailing expression, traceback on errors, threading for large stdin.
"""
import builtins
import io
import marshal
import os
import resource
import sys

_PIPE_CAPACITY = 65536  # stdin up to this size is written in one go, without a feeder thread
# The builtin exception classes, taken before any program runs: a program's own class named ValueError is
# not ValueError, and a test catching ValueError must not catch it.
_BUILTIN_EXCEPTIONS = {name: value for name, value in vars(builtins).items()
                       if isinstance(value, type) and issubclass(value, BaseException)}
_MUTABLE = (list, dict, set)


def read_frame(fd):
    header = _read_exact(fd, 4)
    if header is None:
        return None
    body = _read_exact(fd, int.from_bytes(header, "big"))
    if body is None:
        raise EOFError("the host closed the request pipe in the middle of a frame")
    return marshal.loads(body)


def _read_exact(fd, n):
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            if got == 0:
                return None
            raise EOFError("the host closed the request pipe in the middle of a frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def encode_value(value, depth=0):
    """A plain builtin value as JSON-ready tagged lists (exact types only: no subclasses, no proxies).
    The host's values.decode is the inverse, and does not rely on this function being honest."""
    if depth > 100:
        raise ValueError("the value is nested more than 100 levels deep")
    kind = type(value)
    if value is None:
        return ["n"]
    if kind is bool:
        return ["b", value]
    if kind is int:
        return ["i", format(value, "x")]  # hex: no 4300-digit limit on either side, and exact
    if kind is float:
        return ["f", value.hex()]
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["s", value]
    if kind is bytes:
        return ["y", value.hex()]
    if kind in _CONTAINER_TAGS:
        return [_CONTAINER_TAGS[kind], [encode_value(item, depth + 1) for item in value]]
    if kind is dict:
        return ["d", [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"a {kind.__name__} is not a plain builtin value")


_CONTAINER_TAGS = {list: "l", tuple: "t", set: "S", frozenset: "F"}


def make_proxy(target, request_fd, reply_fd):
    """A stand-in for the solution's function `target`: the call goes to the host (and on to the solution's
    sandbox); the answer is a plain value, or a builtin exception the solution raised."""
    import json

    def proxy(*args, **kwargs):
        body = json.dumps({"call": target, "args": encode_value(args), "kwargs": encode_value(kwargs)})
        write_reply(reply_fd, body.encode())
        answer = read_frame(request_fd)
        if answer is None:
            raise EOFError("the host closed the request pipe during a call")
        if "value" in answer:
            # Arguments cross by value: what the solution did to its copies is done to the tests' own
            # objects, and a returned argument is the tests' own object, so `is` and mutation checks hold.
            if "args_after" in answer:
                update_in_place(args, answer["args_after"])
                update_in_place(kwargs, answer["kwargs_after"])
            same = answer.get("same_as")
            if same is not None:
                return args[same] if type(same) is int else kwargs[same]
            return answer["value"]
        raise getattr(builtins, answer["raised"])(answer["message"])

    proxy.__name__ = proxy.__qualname__ = target
    return proxy


def update_in_place(old, new):
    """Make the containers of `old` hold what `new` holds, keeping the objects of `old` where the shapes
    agree (a list mutated inside a tuple or a dict stays the tests' list)."""
    if type(old) is list and type(new) is list and len(old) == len(new) or type(old) is tuple:
        for i, (a, b) in enumerate(zip(old, new)):
            same_shape = type(a) is type(b) and type(a) in (list, dict, tuple, set)
            if same_shape and (type(a) is not tuple or len(a) == len(b)):
                update_in_place(a, b)
            elif type(old) is list and (type(a) is not type(b) or a != b):
                old[i] = b
    elif type(old) is list:
        old[:] = new
    elif type(old) is dict and type(new) is dict:
        if list(old) == list(new):
            for k in old:
                a, b = old[k], new[k]
                if type(a) is type(b) and type(a) in (list, dict, tuple, set):
                    update_in_place(a, b)
                elif type(a) is not type(b) or a != b:
                    old[k] = b
        else:
            old.clear()
            old.update(new)
    elif type(old) is set and type(new) is set and old != new:
        old.clear()
        old.update(new)


def _holds_mutable(value, depth=0):
    kind = type(value)
    if kind in _MUTABLE:
        return True
    if kind is tuple and depth < 100:
        return any(_holds_mutable(item, depth + 1) for item in value)
    return False


def call_function(namespace, request):
    """Serve one call request in the solution's sandbox: the reply body (JSON bytes)."""
    import json

    _stdin_from_devnull()
    reply = {"id": request["id"]}
    args, kwargs = request["args"], request["kwargs"]
    try:
        value = namespace[request["call"]](*args, **kwargs)
    except BaseException as exc:  # the solution's exception is its answer; the host decides what it means
        # Named by the nearest genuine builtin class it derives from: `class ValueError(Exception)` is an
        # Exception, and `class Bad(ValueError)` is caught by `except ValueError`.
        genuine = next((c.__name__ for c in type(exc).__mro__ if _BUILTIN_EXCEPTIONS.get(c.__name__) is c),
                       "BaseException")
        reply.update(kind="raised", type=genuine, message=_safe_str(exc))
    else:
        try:
            reply.update(kind="value", value=encode_value(value))
            if _holds_mutable((args, kwargs)):
                reply.update(args_after=encode_value(args), kwargs_after=encode_value(kwargs))
                same = [i for i, a in enumerate(args) if a is value] + [k for k, a in kwargs.items() if a is value]
                if same and type(value) in _MUTABLE:
                    reply.update(same_as=same[0])
        except BaseException as exc:
            reply.update(kind="invalid", message=_safe_str(exc))
    restore_stdio()
    return json.dumps(reply).encode()


def _safe_str(exc):
    try:
        return str(exc)[:1000]
    except BaseException:
        return "<unprintable>"


def callable_names(namespace):
    return [name for name, value in list(namespace.items()) if callable(value) and not name.startswith("__")]


def write_reply(fd, body):
    data = len(body).to_bytes(4, "big") + body
    while data:
        data = data[os.write(fd, data):]


def apply_rlimits(rlimits):
    for name, value in rlimits.items():
        kind = getattr(resource, name)
        _, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # only ever lower a limit: raising the hard one is not allowed
        resource.setrlimit(kind, (value, value))


def _feed(fd, data):
    try:
        while data:
            data = data[os.write(fd, data):]
    except BrokenPipeError:
        pass  # the program stopped reading before the end of its input: that is its choice, not an error
    finally:
        os.close(fd)


def attach_stdin(text):
    """Give the cell a fresh fd 0 holding `text`, so input(), sys.stdin and open(0) all see it, then EOF."""
    data = text.encode("utf-8")
    if data:
        read_end, write_end = os.pipe()
        os.dup2(read_end, 0)
        os.close(read_end)
        if len(data) <= _PIPE_CAPACITY:
            _feed(write_end, data)
        else:
            import threading

            threading.Thread(target=_feed, args=(write_end, data), daemon=True).start()
    else:
        _stdin_from_devnull()
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "rb", closefd=False)), encoding="utf-8")


def _stdin_from_devnull():
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def print_user_traceback(exc):
    """The traceback without the runner's own frames, which would only confuse the reader."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def execute(code, filename, namespace, echo, workdir):
    """Run one cell. Returns (kind, exit_code): kind is ok | exit | exception | memory."""
    if filename.startswith("<"):  # a notebook cell: the source lives in memory (linecache: once a session)
        import linecache

        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    else:  # a program file, as `python main.py` would have it: tracebacks and inspect read it from disk
        filename = os.path.join(workdir, filename)
        with open(filename, "w", encoding="utf-8") as f:
            f.write(code)
        namespace["__file__"] = filename
    try:
        if echo:
            import ast

            tree = ast.parse(code, filename)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, filename, "exec"), namespace)
            if last is not None:
                value = eval(compile(last, filename, "eval"), namespace)
                if value is not None:
                    sys.displayhook(value)  # prints the repr, like a notebook's Out[] (and sets builtins._)
        else:
            exec(compile(code, filename, "exec"), namespace)
        return "ok", 0
    except SystemExit as exc:
        code_ = exc.code
        if code_ is None:
            return "exit", 0
        if isinstance(code_, int):
            return "exit", code_
        print(code_, file=sys.stderr)  # sys.exit("message") prints the message and exits 1
        return "exit", 1
    except MemoryError as exc:
        print_user_traceback(exc)
        return "memory", 1
    except BaseException as exc:  # the program's failure is the result we report, whatever it is
        print_user_traceback(exc)
        return "exception", 1


def restore_stdio():
    """Undo what a cell did to the standard streams, and push its output to the host before the reply."""
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    sys.stdout.flush()
    sys.stderr.flush()
    _stdin_from_devnull()


def fresh_namespace():
    # The program's namespace is a fresh __main__ module (not the runner's), so that `import __main__`,
    # pickle and multiprocessing find the functions and classes the program defines.
    program = type(sys)("__main__")
    program.__builtins__ = builtins
    sys.modules["__main__"] = program
    return program.__dict__


def serve(config):
    request_fd, reply_fd = config["request_fd"], config["reply_fd"]
    namespace = fresh_namespace()
    write_reply(reply_fd, b'{"ready": true}')
    while True:
        request = read_frame(request_fd)
        if request is None:
            return 0  # the host closed the session
        if request.get("fresh"):  # a checker reused for the next grading (it never runs a program's code)
            namespace = fresh_namespace()
        if "call" in request:
            write_reply(reply_fd, call_function(namespace, request))
            continue
        if request.get("report_callables"):
            import json  # before the program runs: it may break imports (a rebound exec) for its own process
        for name, target in request.get("proxies", {}).items():
            namespace[name] = make_proxy(target, request_fd, reply_fd)
        attach_stdin(request["stdin"])
        kind, exit_code = execute(request["code"], request["filename"], namespace, request["echo"],
                                  config["workdir"])
        restore_stdio()
        if request.get("report_callables"):
            reply = json.dumps({"id": request["id"], "kind": kind, "exit_code": exit_code,
                                "callables": callable_names(namespace)})
        else:
            # Hand-written JSON (json costs 4 ms to import): id is the host's hex token, kind a fixed word.
            reply = '{"id": "%s", "kind": "%s", "exit_code": %d}' % (request["id"], kind, exit_code)
        write_reply(reply_fd, reply.encode())
        if request["final"]:
            return exit_code


def main():
    config = marshal.loads(bytes.fromhex(sys.argv[1]))
    apply_rlimits(config["rlimits"])
    for fd in (config["request_fd"], config["reply_fd"]):
        os.set_inheritable(fd, False)  # the program's own subprocesses must not get the control pipes
    sys.path[:0] = [config["workdir"]]  # like `python main.py` run from the working directory
    sys.path.extend(config["sys_path"])
    sys.argv = ["main.py"]
    # Big integers are ordinary in math answers; the 4300-digit str() guard protects servers parsing
    # untrusted input, and here the time limit already bounds the cost.
    sys.set_int_max_str_digits(0)
    # Line buffering: output printed before a kill (timeout, crash) still reaches the host.
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(serve(config))


if __name__ == "__main__":
    main()
