module github.com/authgate/traefikplugin

go 1.22
