"""What a run shows: the one column schema (schema), pandas tables (tables), summary.md's text
(markdown), pictures (pictures), the gallery's data (gallery, with templates/), and the one
module that writes report files (writer)."""
