"""Using a trained run: reopen its model (:mod:`.runs`), embed folders of images (:mod:`.embed`), search a
gallery with queries (:mod:`.search`), and the ranked lists of a protocol's queries (:mod:`.ranked`).

See ``docs/own-images.md`` for the commands (``muva embed``, ``muva search``, ``muva eval --dataset``)."""
