"""The console scripts, one thin module each: parse the arguments, call the library, print,
return the exit code (:mod:`.args` has what they share: ``key=value`` parsing and the exit
codes). ``transferlab-train`` (:mod:`.train`) hands the run to Hydra and :mod:`transferlab.run`;
the others call :mod:`transferlab.tools`."""
