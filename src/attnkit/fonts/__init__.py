"""Font files shipped with attnkit: a subset of Noto Sans CJK SC (SIL Open Font License
1.1, see OFL.txt) so that Chinese labels in the pictures never come out as boxes.
``make_subset.py`` rebuilds it."""
