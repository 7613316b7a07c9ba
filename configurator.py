"""
Poor man's configurator, after nanoGPT. Run from a script with

    exec(open('configurator.py').read())

and call the script as `python train.py config/shapes.py --batch_size=8`.
Each config file is plain Python executed over the script's globals, and may only
assign globals the script already has; each `--key=value` overrides one existing
global, with the value parsed as a Python literal when it is one and required to
keep the default's type.
"""
import sys
from ast import literal_eval

for arg in sys.argv[1:]:
    if '=' not in arg:
        # a config file, e.g. config/stage2.py
        assert not arg.startswith('--'), f"expected --key=value or a config file, got {arg!r}"
        print(f"Overriding config with {arg}:")
        with open(arg) as f:
            print(f.read())
        _known = set(globals())
        exec(open(arg).read())
        # a name the script does not have is a typo (learnig_rate = ...) that would otherwise change nothing
        _unknown = sorted(k for k in set(globals()) - _known if not k.startswith('_') and type(globals()[k]) != type(sys))
        if _unknown:
            raise ValueError(f"{arg}: unknown config keys {_unknown}")
    else:
        assert arg.startswith('--'), f"expected --key=value, got {arg!r}"
        key, val = arg[2:].split('=', 1)
        if key not in globals():
            raise ValueError(f"Unknown config key: {key}")
        try:
            attempt = literal_eval(val)  # numbers, booleans, tuples, None
        except (SyntaxError, ValueError):
            attempt = val  # a plain string
        default = globals()[key]
        if default is not None and attempt is not None and type(attempt) != type(default):
            if isinstance(default, float) and isinstance(attempt, int):
                attempt = float(attempt)
            else:
                raise TypeError(f"--{key}={val}: expected {type(default).__name__}, got {type(attempt).__name__}")
        print(f"Overriding: {key} = {attempt!r}")
        globals()[key] = attempt
