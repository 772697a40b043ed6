"""What lets a WarmPool hand an actor to the next run of a Ray session."""

from __future__ import annotations


class Reloadable:
    """Base of the branch actors (with an `incarnation` and a `ready()`)."""

    def reload(self, *args, **kwargs) -> dict:
        """Become a fresh actor of another run: __init__ again with its arguments, in this
        process, whose imports are done. The incarnation stays: it names the process, which
        Ray did not restart."""
        incarnation = self.incarnation
        self.__init__(*args, **kwargs)
        self.incarnation = incarnation
        return self.ready()
