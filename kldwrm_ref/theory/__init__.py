"""The paper's claims as executable checks (docs/theory.md §3-§4, §8): the wake objectives
(:mod:`.objectives`), the recursions on given streams (:mod:`.recursion`) and ``kldwrm verify``
(:mod:`.verify`)."""
