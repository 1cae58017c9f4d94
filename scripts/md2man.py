#!/usr/bin/python3
"""md2man — a man page (roff) from a man-page-style Markdown file.

Usage: md2man.py INPUT.md OUTPUT NAME SECTION

The Markdown subset of docs/*.md man pages: '## HEADING' sections, text
paragraphs, '- ' lists (continued by indented lines), '| a | b |' tables
(first column becomes the tag), ``` code blocks, `code` and **bold**.
The first '# ' line is the title and is dropped (NAME SECTION make .TH)."""
import re
import sys


def esc(text):
    text = text.replace("\\", "\\e")
    text = text.replace("-", "\\-")
    return text


def inline(text):
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:
            out.append("\\fB" + esc(part[1:-1]) + "\\fR")
        else:
            part = esc(part)
            part = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", part)
            out.append(part)
    line = "".join(out)
    if line.startswith((".", "'")):
        line = "\\&" + line
    return line


def convert(lines, name, section):
    out = ['.TH %s %s "" "vdbus" "vdbus manual"' % (name.upper(), section)]
    para = []
    i = 0

    def flush():
        if para:
            out.append(".PP")
            out.append(inline(" ".join(para)))
            para.clear()

    while i < len(lines):
        line = lines[i].rstrip("\n")
        if line.startswith("# "):
            i += 1
            continue
        if line.startswith("## "):
            flush()
            out.append(".SH " + esc(line[3:].strip().upper()))
        elif line.startswith("```"):
            flush()
            out.append(".PP")
            out.append(".RS 2")
            out.append(".nf")
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                out.append(inline(lines[i].rstrip("\n")) or "\\&")
                i += 1
            out.append(".fi")
            out.append(".RE")
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            i -= 1
            for cells in rows[1:]:
                out.append(".TP")
                out.append(inline(cells[0]))
                out.append(inline(" \u2014 ".join(c for c in cells[1:] if c)))
        elif line.startswith("- "):
            flush()
            item = [line[2:].strip()]
            while i + 1 < len(lines) and lines[i + 1].startswith("  ") and lines[i + 1].strip():
                i += 1
                item.append(lines[i].strip())
            out.append(".IP \\(bu 2")
            out.append(inline(" ".join(item)))
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    src, dst, name, section = sys.argv[1:]
    with open(src, encoding="utf-8") as f:
        text = convert(f.readlines(), name, section)
    with open(dst, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
