#!/usr/bin/env bash
# Lay out WordNet 3.0 for NLTK without NLTK's downloader (which needs internet).
#
# Usage: scripts/setup_wordnet.sh [TARGET_DIR]
#   TARGET_DIR defaults to the first entry of $NLTK_DATA, else $HOME/nltk_data.
#   The files end up in TARGET_DIR/corpora/wordnet; point NLTK at TARGET_DIR
#   (NLTK searches $HOME/nltk_data by default; otherwise export NLTK_DATA=TARGET_DIR).
#
# Source: Debian's wordnet-base + wordnet-sense-index packages (/usr/share/wordnet),
# installed with apt-get when missing. The files are COPIED, not linked, so the
# target folder survives a later package removal and can be cached by CI.
# NLTK also reads `lexnames`, which Debian does not ship; it is WordNet 3.0's fixed
# table of the 45 lexicographer files, written below.
# Idempotent: re-running only refreshes the copies.
set -euo pipefail

SRC=/usr/share/wordnet
default_target="${NLTK_DATA:-$HOME/nltk_data}"
default_target="${default_target%%:*}"   # NLTK_DATA may be a path list; use its first entry
TARGET="${1:-$default_target}"
DEST="$TARGET/corpora/wordnet"

need_files=(data.adj data.adv data.noun data.verb index.adj index.adv index.noun index.verb
            adj.exc adv.exc noun.exc verb.exc index.sense)

have_all() {
    local f
    for f in "${need_files[@]}"; do [[ -s "$SRC/$f" ]] || return 1; done
}

if ! have_all; then
    echo "setup_wordnet: installing Debian packages wordnet-base wordnet-sense-index" >&2
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "setup_wordnet: need root (or sudo) to apt-get install wordnet-base wordnet-sense-index" >&2; exit 1; }
        SUDO="sudo"
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index
    have_all || { echo "setup_wordnet: $SRC still incomplete after apt-get install" >&2; exit 1; }
fi

mkdir -p "$DEST"
# Copy every regular file of the database (data.*, index.*, *.exc, cntlist, sense index, verb frames).
for f in "$SRC"/*; do
    [[ -f "$f" ]] && cp -f --dereference "$f" "$DEST/"
done

# WordNet 3.0 lexnames: "<file number>\t<lexicographer file>\t<syntactic category>"
# (1 noun, 2 verb, 3 adjective, 4 adverb). NLTK asserts the numbering is 0..44 in order.
cat > "$DEST/lexnames" <<'LEX'
00	adj.all	3
01	adj.pert	3
02	adv.all	4
03	noun.Tops	1
04	noun.act	1
05	noun.animal	1
06	noun.artifact	1
07	noun.attribute	1
08	noun.body	1
09	noun.cognition	1
10	noun.communication	1
11	noun.event	1
12	noun.feeling	1
13	noun.food	1
14	noun.group	1
15	noun.location	1
16	noun.motive	1
17	noun.object	1
18	noun.person	1
19	noun.phenomenon	1
20	noun.plant	1
21	noun.possession	1
22	noun.process	1
23	noun.quantity	1
24	noun.relation	1
25	noun.shape	1
26	noun.state	1
27	noun.substance	1
28	noun.time	1
29	verb.body	2
30	verb.change	2
31	verb.cognition	2
32	verb.communication	2
33	verb.competition	2
34	verb.consumption	2
35	verb.contact	2
36	verb.creation	2
37	verb.emotion	2
38	verb.motion	2
39	verb.perception	2
40	verb.possession	2
41	verb.social	2
42	verb.stative	2
43	verb.weather	2
44	adj.ppl	3
LEX

echo "setup_wordnet: WordNet ready in $DEST (use NLTK_DATA=$TARGET if that is not ~/nltk_data)"
