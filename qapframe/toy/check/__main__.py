from qapframe.toy._moved import exit_moved

exit_moved("check")
