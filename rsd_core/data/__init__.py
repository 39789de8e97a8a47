"""The corrupted-dataset stage: the format (:mod:`.manifest`), where datasets live (:mod:`.storage`), writing
(:mod:`.writer`) and reading (:mod:`.reader`) them, streaming them into training (:mod:`.streaming`), the
bundled clean sources and their corruption (:mod:`.sources`), and importing a team's own k-space
(:mod:`.kspace_import`)."""
