# The last "all" line of an ultralytics YOLOv5 log (its val.py's summary): prints "mAP50 mAP50-95", nothing if none.
# Also found when a traceback of the peer's plotting thread shares the line (the numbers end the line).
# usage: tr '\r' '\n' < LOG | awk -f bench/peer_map.awk
$1 == "all" || / all +[0-9]+ +[0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$/ {m50 = $(NF-1); m = $NF}
END {if (m != "") print m50, m}
