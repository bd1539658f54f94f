"""What the fork server of tests/forked_cli.py imports once: the launcher and the training entry of
``llamafactory-cli`` (through the plugin's start-up hook, which patches ``llamafactory.train.tuner``)."""

import llamafactory.cli  # noqa: F401
import llamafactory.launcher  # noqa: F401
import llamafactory.train.tuner  # noqa: F401
