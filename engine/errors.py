"""The one error type for the user: every "your input is wrong" error derives from `UserError`.

Each command line (`ddpm-engine`, `ddpm-export`, `ddpm-train`) turns exactly this type into one
`PROG: error: ...` line and exit status 1, and the server into a 4xx; anything else is a bug and
surfaces as one (a traceback). The kinds below say where the input came from; their messages say
what to change.
"""


class UserError(Exception):
    """Input the user can fix: a flag, a file, a request, a missing optional package."""


class ConfigError(UserError, ValueError):
    """A value out of its range or of the wrong kind: a flag, a config field, a sampler setting.
    Also a ValueError, so code validating a file's contents can catch it as one."""
