# peernix as a twistd application file, for init systems that prefer one:
#
#     PEERNIX_CONFIG=/etc/peernix/peernix.toml twistd --nodaemon --pidfile= --python peernix.tac
#
# (``twistd -ny peernix.tac`` for short.)  The settings come from the TOML
# file named by $PEERNIX_CONFIG, with the same keys as the command-line
# options (see docs/configuration.rst); without it, the defaults.  A bad
# setting, store or key stops start-up with one line on stderr.

import os

from peernix.tap import application_from_environment

application = application_from_environment(os.environ)
